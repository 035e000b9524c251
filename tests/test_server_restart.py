"""Nothing lost: SIGKILL a real server mid-conversation, restart it on the same --state-dir, and the next greedy
turns are token for token what an uninterrupted server says."""

import json

import httpx
import pytest
from conftest import SERVER_ARGS
from server_helpers import KEY_A, LIGHTHOUSE, MODEL, ServerProcess, ask

from streamllm.server.persist import VERSION

pytestmark = pytest.mark.real

QUESTIONS = LIGHTHOUSE
KILLED_AT = 4  # turns done before the kill; the fifth is cut off mid-stream


def _conversation(url: str, turns: int, history: list[dict] | None = None) -> tuple[list[str], list[dict]]:
    history = list(history or [])
    replies = []
    for question in QUESTIONS[len(history) // 2 : turns]:
        history.append({"role": "user", "content": question})
        text, _, _ = ask(url, history)
        replies.append(text)
        history.append({"role": "assistant", "content": text})
    return replies, history


def test_sigkill_mid_conversation_then_restart_continues_exactly(server, tmp_path):
    # The uninterrupted server: the shared one, with the same model, cache and threads.
    reference, _ = _conversation(server.url, len(QUESTIONS))

    state = tmp_path / "state"
    args = [*SERVER_ARGS, "--api-key", KEY_A, "--state-dir", str(state)]
    first = ServerProcess(args, tmp_path / "first.log")
    try:
        replies, history = _conversation(first.url, KILLED_AT)
        assert replies == reference[:KILLED_AT]
        # The next turn starts streaming, and the server dies under it.
        body = {"model": MODEL, "messages": [*history, {"role": "user", "content": QUESTIONS[KILLED_AT]}]}
        body |= {"temperature": 0, "max_tokens": 12, "stream": True}
        headers = {"Authorization": f"Bearer {KEY_A}"}
        with httpx.stream("POST", f"{first.url}/v1/chat/completions", json=body, headers=headers) as response:
            session = response.headers["x-session-id"]
            next(
                line
                for line in response.iter_lines()
                if '"content": "' in line and '"content": ""' not in line
            )
            first.kill()
    finally:
        first.stop()

    meta = json.loads((state / "sessions" / session / "meta.json").read_text())
    assert meta["turns"] == KILLED_AT and meta["version"] == VERSION

    second = ServerProcess(args, tmp_path / "second.log")
    try:
        history.append({"role": "user", "content": QUESTIONS[KILLED_AT]})
        text, usage, resumed = ask(second.url, history)
        assert resumed == session  # the saved session, found by its history
        # Restored, not re-fed: everything said in the first four turns (more than the cache holds) is reused.
        assert usage.prompt_tokens_details.cached_tokens == meta["tokens_seen"] > 64
        assert text == reference[KILLED_AT]
        history.append({"role": "assistant", "content": text})
        rest, _ = _conversation(second.url, len(QUESTIONS), history)
        assert rest == reference[KILLED_AT + 1 :]
    finally:
        second.stop()
