"""Two real server processes on one --state-dir: a session is served by one process at a time, under its lease.
The other answers 409 while the lease is held, takes the session over from its latest saved turn once it is let
go (the session leaves the holder's memory, or the holder is SIGKILLed), and no turn is forked or lost: the
greedy replies are token for token an uninterrupted server's."""

import json

import httpx
import openai
import pytest
from conftest import SERVER_ARGS
from server_helpers import KEY_A, LIGHTHOUSE, ServerProcess, ask

pytestmark = pytest.mark.real

QUESTIONS = LIGHTHOUSE[:4]


def _turn(url: str, history: list[dict], question: str, session: str | None = None):
    history.append({"role": "user", "content": question})
    text, usage, session = ask(url, history, session)
    history.append({"role": "assistant", "content": text})
    return text, usage, session


def _refused(url: str, history: list[dict], question: str, session: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        ask(url, [*history, {"role": "user", "content": question}], session)
    assert caught.value.status_code == 409
    assert caught.value.body["code"] == "session_elsewhere", caught.value.body


def test_two_processes_share_sessions_without_losing_a_turn(server, tmp_path):
    reference, ref_history = [], []
    for question in QUESTIONS:  # the uninterrupted server
        reference.append(_turn(server.url, ref_history, question)[0])

    state = tmp_path / "state"
    args = [*SERVER_ARGS, "--api-key", KEY_A, "--state-dir", str(state), "--max-sessions", "1"]
    a = ServerProcess(args, tmp_path / "a.log")
    b = ServerProcess(args, tmp_path / "b.log")
    try:
        history: list[dict] = []
        text, _, session = _turn(a.url, history, QUESTIONS[0])
        assert text == reference[0]
        _refused(b.url, history, QUESTIONS[1], session)  # A holds it: B neither forks nor overwrites it

        _turn(a.url, [], "Something else entirely.")  # A's only memory slot goes to another session
        text, usage, resumed = _turn(b.url, history, QUESTIONS[1], session)  # so B takes it over
        meta = json.loads((state / "sessions" / session / "meta.json").read_text())
        assert resumed == session and text == reference[1]
        assert usage.prompt_tokens_details.cached_tokens > 0  # restored from A's save, not fed again
        assert meta["turns"] == 2

        _refused(a.url, history, QUESTIONS[2], session)  # now B holds it
        gone = httpx.delete(f"{a.url}/v1/sessions/{session}", headers={"Authorization": f"Bearer {KEY_A}"})
        assert gone.status_code == 409 and gone.json()["error"]["code"] == "session_elsewhere"
        b.kill()  # a crash gives the lease back too
        text, _, resumed = _turn(a.url, history, QUESTIONS[2], session)
        assert resumed == session and text == reference[2]
        text, _, _ = _turn(a.url, history, QUESTIONS[3], session)
        assert text == reference[3]
    finally:
        b.stop()
        a.stop()
    meta = json.loads((state / "sessions" / session / "meta.json").read_text())
    assert meta["turns"] == len(QUESTIONS)
    assert len(list((state / "sessions" / session).glob("state-*.safetensors"))) == 1
