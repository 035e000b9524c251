"""Two real server processes on one store: any of them serves any turn of a session, one turn at a time under the
session's lease. While one process runs a turn, the other waits for it (--lease-wait) or answers 409; a process
killed mid-turn loses only that turn, and no turn is forked or lost: the greedy replies are token for token an
uninterrupted server's. The store is a real Redis; a shared --state-dir keeps the same contract through the same
code (``test_store.py`` runs both in one process; the lease of a killed process is its ``flock``, which the
kernel lets go)."""

import json

import httpx
import openai
import pytest
from conftest import SERVER_ARGS
from server_helpers import KEY_A, LIGHTHOUSE, MODEL, ServerProcess, ask

pytestmark = pytest.mark.real

QUESTIONS = LIGHTHOUSE[:4]


def _turn(url: str, history: list[dict], question: str, session: str | None = None):
    history.append({"role": "user", "content": question})
    text, usage, session = ask(url, history, session)
    history.append({"role": "assistant", "content": text})
    return text, usage, session


class Holder:
    """The test itself holding a session's lease, as a process in the middle of a turn would."""

    def __init__(self, redis_server, session):
        self.key, self.client = f"streamllm:s:{session}:lease", redis_server.client()

    def __enter__(self):
        assert self.client.set(self.key, "test", nx=True, px=60_000)
        return self

    def __exit__(self, *exc):
        self.client.delete(self.key)


def test_two_processes_share_sessions_without_losing_a_turn(server, tmp_path, redis_server):
    reference, ref_history = [], []
    for question in QUESTIONS:  # the uninterrupted server
        reference.append(_turn(server.url, ref_history, question)[0])

    args = [*SERVER_ARGS, "--api-key", KEY_A, "--store", redis_server.url, "--lease-ttl", "3"]
    a = ServerProcess([*args, "--lease-wait", "30"], tmp_path / "a.log")
    b = ServerProcess([*args, "--lease-wait", "0"], tmp_path / "b.log")
    try:
        history: list[dict] = []
        text, _, session = _turn(a.url, history, QUESTIONS[0])
        assert text == reference[0]
        text, usage, resumed = _turn(b.url, history, QUESTIONS[1], session)  # B takes it from the store
        assert resumed == session and text == reference[1]
        assert usage.prompt_tokens_details.cached_tokens > 0  # restored from A's save, not fed again

        with Holder(redis_server, session):  # a turn in progress elsewhere: B does not wait for it
            with pytest.raises(openai.APIStatusError) as caught:
                ask(b.url, [*history, {"role": "user", "content": QUESTIONS[2]}], session)
            assert caught.value.status_code == 409 and caught.value.body["code"] == "session_elsewhere"
            gone = httpx.delete(
                f"{b.url}/v1/sessions/{session}", headers={"Authorization": f"Bearer {KEY_A}"}
            )
            assert gone.status_code == 409 and gone.json()["error"]["code"] == "session_elsewhere"
        text, _, resumed = _turn(a.url, history, QUESTIONS[2], session)  # A's copy is older: it reloads
        assert resumed == session and text == reference[2]

        # B is killed in the middle of a turn: that turn is lost, nothing else. A waits for the lease (it runs out
        # after --lease-ttl) and goes on.
        headers = {"Authorization": f"Bearer {KEY_A}", "X-Session-Id": session}
        body = {
            "model": MODEL,
            "messages": [*history, {"role": "user", "content": QUESTIONS[3]}],
            "max_tokens": 64,
            "stream": True,
        }
        with httpx.stream("POST", f"{b.url}/v1/chat/completions", json=body, headers=headers) as streaming:
            next(line for line in streaming.iter_lines() if line.startswith("data:"))
            b.kill()
        text, _, resumed = _turn(a.url, history, QUESTIONS[3], session)
        assert resumed == session and text == reference[3]
    finally:
        b.stop()
        a.stop()
    meta = json.loads(redis_server.client().get(f"streamllm:s:{session}:meta"))
    assert meta["turns"] == len(QUESTIONS)
