"""The server as clients see it: a real ``streamllm serve`` process with the real model, the official ``openai``
client, a cache of 4 + 60 tokens so that every conversation here runs well past it."""

import json
import threading

import httpx
import openai
import pytest
from server_helpers import KEY_A, KEY_B, MODEL, chat

pytestmark = pytest.mark.real
CACHE = 64


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY_A, max_retries=0, timeout=300)


def _ask(client, messages, **params):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=params.pop("max_tokens", 16), **params
    )
    return raw.parse(), raw.headers


def _session(server, session_id, key=KEY_A):
    return httpx.get(f"{server.url}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {key}"})


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server.url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_multi_turn_chat_far_past_the_cache_feeds_only_new_tokens(server, client):
    opening = (
        "Hello! I grew up by a grey northern coast, where the tide came in twice a day over wide flat sands, gulls "
        "followed the fishing boats home every evening, and winter storms threw seaweed and driftwood far up the "
        "beach. Please tell me about the sea."
    )  # long enough that six short turns add up to more than three caches, however the replies come out
    messages = [{"role": "user", "content": opening}]
    questions = ["Why is it salty?", "Name a fish.", "What about the sky?", "Is it blue?", "Thanks, bye."]
    sessions, fed, previous = set(), [], None
    for question in [None, *questions]:
        if question:
            messages.append({"role": "user", "content": question})
        reply, headers = _ask(client, messages)
        text = reply.choices[0].message.content
        assert text.strip() and reply.choices[0].finish_reason in ("stop", "length")
        usage = reply.usage
        if previous is not None:
            # Everything said before, prompt and reply, is reused: only the new turn's tokens are fed.
            assert (
                usage.prompt_tokens_details.cached_tokens
                == previous.prompt_tokens + previous.completion_tokens
            )
        fed.append(usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens)
        assert int(headers["x-prompt-tokens-fed"]) == fed[-1]
        sessions.add(headers["x-session-id"])
        messages.append({"role": "assistant", "content": text})
        previous = usage
    assert len(sessions) == 1
    assert previous.prompt_tokens > 3 * CACHE  # the conversation is far longer than the cache...
    assert max(fed[1:]) < 30  # ...yet each later turn feeds only its own few tokens
    state = _session(server, sessions.pop()).json()
    assert state["cache_length"] == CACHE and state["tokens_seen"] > 3 * CACHE and state["turns"] == 6


def test_streaming_matches_non_streaming(server, client):
    messages = [{"role": "user", "content": "Write one sentence about streaming rivers."}]
    whole, _ = _ask(client, messages)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # On the wire: OpenAI's server-sent events, ending with [DONE].
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 4, "stream": True}
    raw = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"}
    )
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.headers["x-session-id"]
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_text_completions_continue_their_text(server):
    text = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY_A, max_retries=0)
    first = text.completions.create(model=MODEL, prompt="The lighthouse keeper", max_tokens=8, temperature=0)
    assert first.object == "text_completion" and first.choices[0].finish_reason == "length"
    more = text.completions.create(
        model=MODEL,
        prompt="The lighthouse keeper" + first.choices[0].text + " Then",
        max_tokens=8,
        temperature=0,
    )
    assert more.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens
    streamed = text.completions.create(
        model=MODEL, prompt="Rain fell", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices)


def test_a_changed_history_starts_a_fresh_session_and_leaves_the_old_one_alone(server, client):
    history = [{"role": "user", "content": "My name is Ada. Say hello to me."}]
    first, h1 = _ask(client, history, max_tokens=8)
    history.append({"role": "assistant", "content": first.choices[0].message.content})
    edited = [{"role": "user", "content": "My name is Bob. Say hello to me."}, history[1]]
    reply, h2 = _ask(client, [*edited, {"role": "user", "content": "What is my name?"}], max_tokens=4)
    assert h2["x-session-id"] != h1["x-session-id"] and reply.usage.prompt_tokens_details.cached_tokens == 0
    # An edited assistant reply does not match either.
    tampered = [history[0], {"role": "assistant", "content": "Go away."}, {"role": "user", "content": "Why?"}]
    _, h3 = _ask(client, tampered, max_tokens=4)
    assert h3["x-session-id"] not in (h1["x-session-id"], h2["x-session-id"])
    # The original conversation goes on in its own session, untouched.
    again, h4 = _ask(client, [*history, {"role": "user", "content": "What is my name?"}], max_tokens=4)
    assert h4["x-session-id"] == h1["x-session-id"] and again.usage.prompt_tokens_details.cached_tokens > 0


def test_explicit_session_id_with_only_the_new_message(server, client):
    first_turn = [{"role": "user", "content": "Count from one to three."}]
    full_1, headers = _ask(client, first_turn)
    full_history = [*first_turn, {"role": "assistant", "content": full_1.choices[0].message.content}]
    full_2, _ = _ask(client, [*full_history, {"role": "user", "content": "Now from four to six."}])

    short_1, headers = _ask(client, first_turn)
    session = headers["x-session-id"]
    assert short_1.session_id == session  # also in the body, for clients that cannot read headers
    new_only = [{"role": "user", "content": "Now from four to six."}]
    short_2, headers = _ask(client, new_only, extra_headers={"X-Session-Id": session})
    assert headers["x-session-id"] == session
    assert short_2.choices[0].message.content == full_2.choices[0].message.content
    assert short_2.usage.prompt_tokens == full_2.usage.prompt_tokens


def test_sessions_belong_to_their_key(server):
    first = chat(server.url, [{"role": "user", "content": "A secret for key A only."}], max_tokens=4)
    session = first.headers["x-session-id"]
    assert _session(server, session, KEY_B).status_code == 404
    stolen = chat(server.url, [{"role": "user", "content": "Hi"}], key=KEY_B, session=session, max_tokens=4)
    assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "session_not_found"
    history = [
        {"role": "user", "content": "A secret for key A only."},
        {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Tell me."},
    ]
    other = chat(server.url, history, key=KEY_B, max_tokens=4)
    assert other.status_code == 200 and other.headers["x-session-id"] != session
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    def listed(key):
        response = httpx.get(f"{server.url}/v1/sessions", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
        return response.json()["data"]

    mine, theirs = listed(KEY_A), listed(KEY_B)
    assert mine[0]["id"] == session  # most recent first
    assert session not in {s["id"] for s in theirs} and other.headers["x-session-id"] in {
        s["id"] for s in theirs
    }
    assert mine[0]["cache"] == {
        "method": "sink",
        "num_sinks": 4,
        "window": 60,
        "size": CACHE,
        "kv_dtype": "model",
    }
    assert mine[0]["evicted"] == mine[0]["tokens_seen"] - mine[0]["cache_length"]
    assert httpx.get(f"{server.url}/v1/sessions").status_code == 401


def test_a_message_longer_than_the_cache_is_served(server, client):
    long_message = (
        "Here is a long list of words: " + " ".join(f"word{i}" for i in range(200)) + ". Summarise it."
    )
    reply, headers = _ask(client, [{"role": "user", "content": long_message}], max_tokens=4)
    assert reply.usage.prompt_tokens > 5 * CACHE
    assert _session(server, headers["x-session-id"]).json()["cache_length"] == CACHE


def test_least_recently_used_sessions_go_to_disk_and_come_back(server, client):
    history = [{"role": "user", "content": "Remember the colour teal."}]
    reply, headers = _ask(client, history, max_tokens=8)
    session = headers["x-session-id"]
    for i in range(9):  # more sessions than --max-sessions 8
        chat(server.url, [{"role": "user", "content": f"Filler conversation number {i}."}], max_tokens=1)
    state = _session(server, session).json()
    assert state["in_memory"] is False and state["saved"] is True
    history += [{"role": "assistant", "content": reply.choices[0].message.content}]
    again, headers = _ask(client, [*history, {"role": "user", "content": "Which colour?"}], max_tokens=8)
    assert headers["x-session-id"] == session
    assert again.usage.prompt_tokens_details.cached_tokens == reply.usage.total_tokens
    assert _session(server, session).json()["in_memory"] is True


def test_a_client_that_disconnects_cancels_its_generation(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 64,
    }
    body |= {"temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as response:
        session = response.headers["x-session-id"]
        lines = response.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
    # The connection is closed after one token; the turn is undone instead of running to 64 tokens.
    state = _wait_idle(server, session)
    assert state["turns"] == 0 and state["tokens_seen"] in (0, None)


def _wait_idle(server, session):
    for _ in range(600):
        state = _session(server, session).json()
        if not state["busy"]:
            return state
        threading.Event().wait(0.1)
    raise AssertionError("the session stayed busy")


WORDS = ["apple", "banana", "cherry", "dolphin", "emerald", "falcon", "guitar", "harbor"]


def _conversation(url: str, key: str, word: str, record=None) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    messages = [{"role": "user", "content": f"Repeat exactly this word: {word}"}]
    replies = []
    for follow_up in ("Again, just that word.", None):
        text = ""
        for chunk in client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=5, stream=True
        ):
            if record is not None and chunk.choices and chunk.choices[0].delta.content:
                record.append(("token", word))
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        if record is not None:
            record.append(("end", word))
        replies.append(text)
        messages += [{"role": "assistant", "content": text}]
        if follow_up:
            messages.append({"role": "user", "content": follow_up})
    return replies


def test_eight_concurrent_conversations_match_sequential_ones(server):
    sequential = {word: _conversation(server.url, KEY_A, word) for word in WORDS}
    # The same conversations at once, under the other key (so they cannot land in the sessions above).
    concurrent, record, errors = {}, [], []

    def run(word):
        try:
            concurrent[word] = _conversation(server.url, KEY_B, word, record)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in WORDS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert concurrent == sequential  # greedy: no conversation saw another's tokens
    # (The comparison means something: the conversations differ from one another.)
    assert len({tuple(replies) for replies in sequential.values()}) >= 6, sequential
    # The conversations ran together: their tokens interleave instead of arriving one turn after another.
    switches = sum(a[1] != b[1] for a, b in zip(record, record[1:], strict=False))
    assert switches > 2 * len(WORDS) * 2


def test_a_short_request_is_not_stuck_behind_a_long_one(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY_A, max_retries=0, timeout=300)
    long = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7,", max_tokens=48, temperature=0, stream=True
    )
    events, short = [], {}
    for i, chunk in enumerate(long):
        events.append("long")
        if i == 0:  # the long one is generating: now a short one arrives
            short_thread = threading.Thread(
                target=lambda: (
                    short.update(
                        r=client.completions.create(
                            model=MODEL, prompt="The cat", max_tokens=3, temperature=0
                        )
                    )
                    or events.append("short done")
                )
            )
            short_thread.start()
        finish = chunk.choices[0].finish_reason if chunk.choices else None
    short_thread.join()
    assert short["r"].usage.completion_tokens == 3
    if finish == "length":  # (an early end of the long one would prove nothing)
        assert "long" in events[events.index("short done") :]  # the short one finished first


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_INPUTS = [
    # (what, body or raw bytes, extra headers, status, param)
    ("not JSON", b'{"model": "x", "messages": [', {}, 400, None),
    ("not an object", b"[1, 2]", {}, 400, None),
    ("plain text", b"hello", {"Content-Type": "text/plain"}, 400, None),
    ("no model", {"messages": GOOD["messages"]}, {}, 400, "model"),
    ("unknown model", GOOD | {"model": "gpt-4"}, {}, 404, "model"),
    ("no messages", {"model": MODEL}, {}, 400, "messages"),
    ("empty messages", GOOD | {"messages": []}, {}, 400, "messages"),
    ("unknown role", GOOD | {"messages": [{"role": "wizard", "content": "hi"}]}, {}, 400, "messages[0].role"),
    ("content not text", GOOD | {"messages": [{"role": "user", "content": 7}]}, {}, 400, "messages[0].content"),
    ("lone surrogate", b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % MODEL.encode(),
     {}, 400, "messages[0].content"),
    ("message too long", GOOD | {"messages": [{"role": "user", "content": "x" * 20001}]}, {}, 400,
     "messages[0].content"),
    ("temperature", GOOD | {"temperature": 2.5}, {}, 400, "temperature"),
    ("temperature NaN", json.dumps(GOOD | {"temperature": float("nan")}).encode(), {}, 400, "temperature"),
    ("top_p", GOOD | {"top_p": 1.5}, {}, 400, "top_p"),
    ("max_tokens zero", GOOD | {"max_tokens": 0}, {}, 400, "max_tokens"),
    ("max_tokens over the limit", GOOD | {"max_tokens": 65}, {}, 400, "max_tokens"),
    ("max_tokens not a number", GOOD | {"max_tokens": "many"}, {}, 400, "max_tokens"),
    ("n", GOOD | {"n": 2}, {}, 400, "n"),
    ("five stops", GOOD | {"stop": ["a", "b", "c", "d", "e"]}, {}, 400, "stop"),
    ("empty stop", GOOD | {"stop": ""}, {}, 400, "stop"),
    ("seed too big", GOOD | {"seed": 2**70}, {}, 400, "seed"),
    ("tools", GOOD | {"tools": [{"type": "function", "function": {"name": "f"}}]}, {}, 400, "tools"),
    ("stream not boolean", GOOD | {"stream": "yes please"}, {}, 400, "stream"),
    ("oversized body", GOOD | {"messages": [{"role": "user", "content": "x" * 250_000}]}, {}, 413, None),
    ("unknown session", GOOD, {"X-Session-Id": "A" * 32}, 404, "X-Session-Id"),
    ("malformed session", GOOD, {"X-Session-Id": "../../etc/passwd"}, 404, "X-Session-Id"),
    ("wrong key", GOOD, {"Authorization": "Bearer nope"}, 401, None),
    ("no key", GOOD, {"Authorization": ""}, 401, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "body", "headers", "status", "param"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_gets_an_openai_error_with_the_right_status(server, what, body, headers, status, param):
    all_headers = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"} | headers
    all_headers = {k: v for k, v in all_headers.items() if v}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=content, headers=all_headers, timeout=60
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_the_openai_client_raises_its_own_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=9
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert (
        httpx.get(f"{server.url}/v1/nowhere", headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 404
    )
