"""Nothing lost: SIGKILL a real server mid-conversation, restart it on the same --state-dir, and the next greedy
turns are token for token what an uninterrupted server says."""

import json

import httpx
import openai
import pytest
from conftest import SERVER_ARGS
from server_helpers import KEY_A, MODEL, ServerProcess

pytestmark = pytest.mark.real

QUESTIONS = [
    "Let's talk about lighthouses. What does a lighthouse do?",
    "Who works in one?",
    "What happens in a storm?",
    "How tall are they?",
    "Name a famous one.",
    "Thank you. Summarise our chat in one line.",
]
KILLED_AT = 4  # turns done before the kill; the fifth is cut off mid-stream


def _turn(url: str, messages: list[dict]) -> tuple[str, dict, str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY_A, max_retries=0, timeout=300)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12
    )
    reply = raw.parse()
    return reply.choices[0].message.content, reply.usage, raw.headers["x-session-id"]


def _conversation(url: str, turns: int, history: list[dict] | None = None) -> tuple[list[str], list[dict]]:
    history = list(history or [])
    replies = []
    for question in QUESTIONS[len(history) // 2 : turns]:
        history.append({"role": "user", "content": question})
        text, _, _ = _turn(url, history)
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
    assert meta["turns"] == KILLED_AT and meta["version"] == 1

    second = ServerProcess(args, tmp_path / "second.log")
    try:
        history.append({"role": "user", "content": QUESTIONS[KILLED_AT]})
        text, usage, resumed = _turn(second.url, history)
        assert resumed == session  # the saved session, found by its history
        # Restored, not re-fed: everything said in the first four turns (more than the cache holds) is reused.
        assert usage.prompt_tokens_details.cached_tokens == meta["tokens_seen"] > 64
        assert text == reference[KILLED_AT]
        history.append({"role": "assistant", "content": text})
        rest, _ = _conversation(second.url, len(QUESTIONS), history)
        assert rest == reference[KILLED_AT + 1 :]
    finally:
        second.stop()
