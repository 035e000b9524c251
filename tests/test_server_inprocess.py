"""Server behaviour that needs a hand inside the process (failures, timeouts, damaged files), on a tiny random
model that speaks the real tokenizer, served by uvicorn on a loopback port in a thread."""

import dataclasses
import json
import threading
from array import array

import httpx
import pytest
import torch
from server_helpers import ThreadServer

from streamllm import StreamConfig
from streamllm.config import MemoryConfig
from streamllm.runtime.stream import Stream
from streamllm.server import ServerConfig, create_app
from streamllm.server.journal import metadata
from streamllm.server.persist import Conversation, decode_state, encode_state
from streamllm.server.statedir import StateDir

KEY = "inprocess-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAM = StreamConfig(num_sinks=4, window=28, chunk_size=16)


# The servers here run in this process: one torch thread keeps them from fighting over the cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _serve(tiny, **overrides) -> ThreadServer:
    model, tokenizer = tiny
    settings = {
        "model_id": "tiny",
        "stream": STREAM,
        "api_keys": (KEY,),
        "max_tokens_limit": 4000,
    } | overrides
    return ThreadServer(create_app(model, tokenizer, ServerConfig(**settings)))


def _chat(url, messages, session=None, **params):
    headers = dict(AUTH, **({"X-Session-Id": session} if session else {}))
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 3} | params
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def _state(url, session):
    return httpx.get(f"{url}/v1/sessions/{session}", headers=AUTH).json()


def _idle_state(url, session):
    for _ in range(600):
        state = _state(url, session)
        if not state["busy"]:
            return state
        threading.Event().wait(0.05)
    raise AssertionError("the session stayed busy")


@pytest.mark.parametrize(
    "config",
    [
        StreamConfig(num_sinks=4, window=20, rebase_every=8),  # wrapped ring, rebased positions
        StreamConfig(num_sinks=4, window=200),  # not full yet: only the written slots are saved
        StreamConfig(method="dense"),
        StreamConfig(num_sinks=2, window=10, method="recompute"),
        StreamConfig(num_sinks=4, window=20, rebase_every=8, kv_dtype="int8"),
    ],
    ids=["sink", "young", "dense", "recompute", "int8"],
)
def test_saved_state_continues_bit_for_bit(tiny, config):
    model, _ = tiny
    ids = torch.randint(0, 1000, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    live = Stream(model, config)
    live.feed(ids[:60])
    text = "héllo".encode()
    convo = Conversation.of(text, ids[:60], turns=1)
    meta, blob = encode_state("x" * 32, "owner", "tiny", config, convo, live, (text, array("i", ids[:60])))
    restored = Stream(model, config)
    back = decode_state(meta, blob, restored)
    assert (back.text_bytes, back.sha256, back.token_count, back.turns) == (6, convo.sha256, 60, 1)
    assert not back.unsaved_text and not back.unsaved_tokens  # all of it is on disk
    assert restored.tokens_seen == live.tokens_seen and restored.cache_length == live.cache_length
    for token in ids[60:]:
        assert torch.equal(live.feed([token]), restored.feed([token]))


def test_a_server_failure_is_a_500_and_the_server_keeps_serving(tiny, monkeypatch):
    with _serve(tiny) as server:
        first = _chat(server.url, [{"role": "user", "content": "hello"}])
        session = first.headers["x-session-id"]
        history = [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
            {"role": "user", "content": "more"},
        ]
        feed, calls = Stream.feed, []

        def failing_feed(self, ids, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # in the middle of the turn, after part of it went in
                raise RuntimeError("simulated failure in the model")
            return feed(self, ids, **kwargs)

        monkeypatch.setattr(Stream, "feed", failing_feed)
        failed = _chat(server.url, history)
        calls.clear()
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["type"] == "server_error" and "simulated failure" in error["message"]
        streamed = _chat(server.url, history, stream=True)
        assert streamed.status_code == 200 and '"error"' in streamed.text and "[DONE]" not in streamed.text
        monkeypatch.setattr(Stream, "feed", feed)
        # The failed turns were undone: the session continues from its first turn, as if they never happened.
        again = _chat(server.url, history)
        assert again.status_code == 200 and again.headers["x-session-id"] == session
        assert (
            again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            == first.json()["usage"]["total_tokens"]
        )


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_timeout_is_a_504_and_the_turn_is_undone(tiny, tmp_path, on_disk):
    state_dir = tmp_path if on_disk else None
    with _serve(tiny, request_timeout_s=1.0, state_dir=state_dir, max_tokens_limit=100_000) as server:
        first = _chat(server.url, [{"role": "user", "content": "hello"}])
        session = first.headers["x-session-id"]
        before = _state(server.url, session)
        slow = _chat(
            # far more tokens than a second decodes on the tiny model (4000 finished within it once decoding got
            # faster), so that the turn is still running when the timeout comes
            server.url,
            [{"role": "user", "content": "and now a lot"}],
            session=session,
            max_tokens=100_000,
        )
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "request_timeout"
        after = _idle_state(server.url, session)
        assert after["turns"] == before["turns"] == 1
        follow = _chat(server.url, [{"role": "user", "content": "short"}], session=session)
        assert follow.status_code == 200
        fresh = _chat(server.url, [{"role": "user", "content": "hello"}], max_tokens=3)
        text = fresh.json()["choices"][0]["message"]["content"]
        assert text == first.json()["choices"][0]["message"]["content"]


def test_damaged_state_breaks_only_its_own_session(tiny, tmp_path):
    histories = {}
    with _serve(tiny, state_dir=tmp_path) as server:
        for name in ("corrupt", "version", "garbage", "intact"):
            messages = [{"role": "user", "content": f"conversation {name}"}]
            reply = _chat(server.url, messages)
            histories[name] = (reply.headers["x-session-id"], messages, reply.json())
    folder = tmp_path / "sessions"
    corrupt = folder / histories["corrupt"][0]
    state_file = next(corrupt.glob("state-*.safetensors"))
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state_file.write_bytes(bytes(data))
    meta_path = folder / histories["version"][0] / "meta.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"version": 99}))
    (folder / histories["garbage"][0] / "meta.json").write_text("{not json")

    with _serve(tiny, state_dir=tmp_path) as server:
        for name, needle in (("corrupt", "corrupted"), ("version", "version 99"), ("garbage", "unreadable")):
            session, messages, _ = histories[name]
            broken = _chat(server.url, [{"role": "user", "content": "next"}], session=session)
            assert broken.status_code == 500, name
            assert (
                needle in broken.json()["error"]["message"] and session in broken.json()["error"]["message"]
            )
            assert broken.json()["error"]["code"] == "session_state_unusable"
        session, messages, reply = histories["intact"]
        history = [*messages, reply["choices"][0]["message"], {"role": "user", "content": "next"}]
        ok = _chat(server.url, history)
        assert ok.status_code == 200 and ok.headers["x-session-id"] == session
        assert ok.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == reply["usage"]["total_tokens"]
        # Without the id, the damaged conversation's history is simply served by a new session.
        session, messages, reply = histories["corrupt"]
        history = [*messages, reply["choices"][0]["message"], {"role": "user", "content": "next"}]
        fresh = _chat(server.url, history)
        assert fresh.status_code == 200 and fresh.headers["x-session-id"] != session


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", "..", "a/b", "%2e%2e%2f" * 3, "x" * 32 + "/..", "\x00" * 32]
)
def test_session_ids_never_become_paths_outside_the_state_dir(tiny, tmp_path, bad):
    with pytest.raises(ValueError):
        StateDir(tmp_path, "tiny", STREAM).folder(bad)
    with _serve(tiny, state_dir=tmp_path) as server:
        reply = _chat(server.url, [{"role": "user", "content": "hi"}], session=bad.replace("\x00", "0"))
        assert reply.status_code == 404
        got = httpx.get(f"{server.url}/v1/sessions/{bad.replace(chr(0), '0')}", headers=AUTH)
        # ".../x/.." is normalized by the client to /v1/sessions: the caller's own list, not a path escape.
        assert got.status_code == 404 or got.json()["object"] == "list"
    assert [p.name for p in tmp_path.iterdir()] == ["sessions"]


def test_a_streamed_body_over_the_limit_is_refused(tiny):
    with _serve(tiny, max_body_bytes=1000) as server:

        def body():  # no Content-Length: chunked transfer
            for _ in range(20):
                yield b" " * 100

        headers = dict(AUTH, **{"Content-Type": "application/json"})
        reply = httpx.post(f"{server.url}/v1/chat/completions", content=body(), headers=headers)
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
        assert _chat(server.url, [{"role": "user", "content": "hi"}]).status_code == 200


def test_requests_on_one_session_take_turns(tiny):
    with _serve(tiny) as server:
        first = _chat(server.url, [{"role": "user", "content": "hello"}])
        session = first.headers["x-session-id"]
        replies = {}

        def send(name):
            replies[name] = _chat(
                server.url, [{"role": "user", "content": name}], session=session, max_tokens=20
            )

        threads = [threading.Thread(target=send, args=(name,)) for name in ("one", "two")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        usages = sorted((r.json()["usage"] for r in replies.values()), key=lambda u: u["prompt_tokens"])
        # The second request ran on the session as the first one left it: nothing interleaved, nothing lost.
        assert usages[1]["prompt_tokens_details"]["cached_tokens"] == usages[0]["total_tokens"]
        assert _state(server.url, session)["turns"] == 3
        deleted = httpx.delete(f"{server.url}/v1/sessions/{session}", headers=AUTH)
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert httpx.get(f"{server.url}/v1/sessions/{session}", headers=AUTH).status_code == 404
        assert _chat(server.url, [{"role": "user", "content": "hi"}], session=session).status_code == 404


@pytest.mark.parametrize("decode", ["fast", "transformers"])
@pytest.mark.parametrize("which", ["tiny", pytest.param("real", marks=pytest.mark.real)])
def test_a_batched_decode_step_matches_single_steps(request, which, decode):
    """Through the native decoder's step_many (fast) and through the model's forward, one row per stream."""
    from streamllm.backends.batched import batchable, decode_step

    model, _ = request.getfixturevalue(which)
    steps = 30 if which == "tiny" else 8
    config = StreamConfig(num_sinks=4, window=28, rebase_every=8, decode=decode)
    ids = torch.randint(100, 1000, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    lengths = [3, 40, 150]  # a young cache, a full one, one whose positions were rebased
    single, batched = [Stream(model, config) for _ in lengths], [Stream(model, config) for _ in lengths]
    for a, b, n in zip(single, batched, lengths, strict=True):
        a.feed(ids[:n])
        b.feed(ids[:n])
    assert all(batchable(s.cache) for s in batched)
    for step in range(steps):
        tokens = [ids[n + step] for n in lengths]
        want = torch.stack([s.feed([t]) for s, t in zip(single, tokens, strict=True)])
        got = decode_step(model, [s.cache for s in batched], tokens, batched[0].decoder)
        assert (want - got).abs().max() < 2e-4 and torch.equal(want.argmax(-1), got.argmax(-1))
    assert [s.tokens_seen for s in batched] == [s.tokens_seen for s in single]
    assert (
        [s.cache_length for s in batched]
        == [s.cache_length for s in single]
        == [min(n + steps, 32) for n in lengths]
    )


@pytest.mark.parametrize("decode", ["fast", "transformers"])
def test_memory_streams_share_decode_steps_between_selections(tiny, decode):
    """Streams with a memory decode together except at a token that selects, which goes alone; either way every
    stream goes on as it would alone."""
    from streamllm.runtime.stream import feed_together

    model, _ = tiny
    config = dataclasses.replace(MEMORY_STREAM, decode=decode)
    ids = torch.randint(100, 1000, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    lengths = [60, 90, 137]  # each past its window, with blocks in memory, at different selection phases
    single, batched = [Stream(model, config) for _ in lengths], [Stream(model, config) for _ in lengths]
    for a, b, n in zip(single, batched, lengths, strict=True):
        a.feed(ids[:n])
        b.feed(ids[:n])
    shared = alone = 0
    for step in range(40):
        tokens = [ids[n + step] for n in lengths]
        want = torch.stack([s.feed([t]) for s, t in zip(single, tokens, strict=True)])
        rows = [r for r, s in enumerate(batched) if s.batchable]
        got = torch.empty_like(want)
        if len(rows) > 1:
            got[rows] = feed_together([batched[r] for r in rows], [tokens[r] for r in rows])
            shared += 1
        else:
            rows = []
        for r, s in enumerate(batched):
            if r not in rows:
                got[r] = s.feed([tokens[r]])
                alone += 1
        assert (want - got).abs().max() < 2e-4 and torch.equal(want.argmax(-1), got.argmax(-1)), step
    assert shared > 20 and alone > 0  # most steps shared, and the selecting tokens went alone
    for a, b in zip(single, batched, strict=True):
        assert a.memory.stats()["blocks"] == b.memory.stats()["blocks"] > 5
        assert all(a.memory.layers[i].selected == b.memory.layers[i].selected for i in a.memory.layers)


@pytest.mark.parametrize("memory", [False, True], ids=["sink", "memory"])
def test_batched_decoding_serves_concurrent_sessions_alike(tiny, memory):
    stream = MEMORY_STREAM if memory else STREAM

    def conversations(url):
        replies, threads = {}, []

        def talk(i):
            messages = [{"role": "user", "content": f"conversation {i}"}]
            first = _chat(url, messages, max_tokens=12).json()["choices"][0]["message"]
            second = _chat(url, [*messages, first, {"role": "user", "content": "more"}], max_tokens=12)
            replies[i] = (first["content"], second.json()["choices"][0]["message"]["content"])

        threads = [threading.Thread(target=talk, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return replies

    with _serve(tiny, stream=stream) as server:
        alone = conversations(server.url)
    app = create_app(*tiny, ServerConfig(model_id="tiny", stream=stream, api_keys=(KEY,), batch_decode=4))
    with ThreadServer(app) as server:
        together = conversations(server.url)
        scheduler = app.state.turns.scheduler
    assert together == alone and len(alone) == 6
    assert scheduler.batched_steps > 0 and scheduler.batched_rows > scheduler.batched_steps


MEMORY_STREAM = dataclasses.replace(
    STREAM, memory=MemoryConfig(block_size=8, blocks=2, reps=2, refresh=16, ram_mb=1)
)
QUESTIONS = ["tell me about rivers", "and the sea?", "what lives there", "why is it salty", "thank you"]


def _turns(url, session, questions):
    replies = []
    for question in questions:
        reply = _chat(url, [{"role": "user", "content": question}], session=session, max_tokens=4)
        assert reply.status_code == 200, reply.text
        session = reply.headers["x-session-id"]
        replies.append(reply.json()["choices"][0]["message"]["content"])
    return session, replies


def test_a_session_memory_is_saved_undone_restored_and_deleted(tiny, tmp_path):
    with _serve(tiny, stream=MEMORY_STREAM) as server:  # uninterrupted, nothing on disk
        _, reference = _turns(server.url, None, QUESTIONS)
    with _serve(tiny, stream=MEMORY_STREAM, state_dir=tmp_path, request_timeout_s=2.0) as server:
        session, replies = _turns(server.url, None, QUESTIONS[:3])
        other, _ = _turns(server.url, None, QUESTIONS[:3])
        assert replies == reference[:3]
        state = _state(server.url, session)
        assert state["memory"]["blocks"] > 2 and state["memory"]["disk_bytes"] > 0
        memory_file = tmp_path / "sessions" / session / "memory.bin"
        assert memory_file.stat().st_size == state["memory"]["disk_bytes"]
        slow = _chat(
            server.url, [{"role": "user", "content": "a long one"}], session=session, max_tokens=4000
        )
        assert slow.status_code == 504
        assert _idle_state(server.url, session)["turns"] == 3
    # restarted without memory: the error says how to continue the session
    with _serve(tiny, stream=STREAM, state_dir=tmp_path) as server:
        refused = _chat(server.url, [{"role": "user", "content": "next"}], session=session)
        assert "saved by a server with memory" in refused.json()["error"]["message"], refused.text
    other_file = tmp_path / "sessions" / other / "memory.bin"
    other_file.write_bytes(other_file.read_bytes()[:-10])  # a damaged memory breaks only its own session
    with _serve(tiny, stream=MEMORY_STREAM, state_dir=tmp_path) as server:
        saved = _state(server.url, session)
        assert not saved["in_memory"] and saved["memory"]["blocks"] == state["memory"]["blocks"]
        _, rest = _turns(server.url, session, QUESTIONS[3:])
        assert rest == reference[3:]  # the undone turn left no trace, and the memory came back whole
        broken = _chat(server.url, [{"role": "user", "content": "next"}], session=other)
        assert (
            broken.status_code == 500
            and "memory file memory.bin is truncated" in broken.json()["error"]["message"]
        )
        gone = httpx.delete(f"{server.url}/v1/sessions/{session}", headers=AUTH)
        assert gone.status_code == 200 and not memory_file.parent.exists()


def test_an_8bit_session_is_saved_in_8_bits_and_restarts_either_way(tiny, tmp_path):
    """With --kv-dtype int8 the state file holds int8 keys and their scales; a server restarted with the same
    setting continues the session as if never stopped, and one restarted with the model-dtype cache takes it over
    (converted) too."""
    from safetensors.torch import load_file

    eight = dataclasses.replace(STREAM, kv_dtype="int8")
    with _serve(tiny, stream=eight) as server:  # uninterrupted, nothing on disk
        _, reference = _turns(server.url, None, QUESTIONS)
    with _serve(tiny, stream=eight, state_dir=tmp_path) as server:
        session, replies = _turns(server.url, None, QUESTIONS[:3])
        assert replies == reference[:3]
        assert _state(server.url, session)["cache"]["kv_dtype"] == "int8"
    state = load_file(next((tmp_path / "sessions" / session).glob("state-*.safetensors")))
    assert state["layers.0.keys"].dtype == torch.int8 and state["layers.0.key_scales"].dtype == torch.float32
    with _serve(tiny, stream=eight, state_dir=tmp_path) as server:
        _, rest = _turns(server.url, session, QUESTIONS[3:])
        assert rest == reference[3:]
    with _serve(tiny, stream=STREAM, state_dir=tmp_path) as server:
        _, more = _turns(server.url, session, ["and once more"])
        assert _state(server.url, session)["turns"] == len(QUESTIONS) + 1


@pytest.mark.parametrize("memory", [False, True], ids=["sink", "memory"])
def test_turns_append_to_a_journal_that_survives_a_torn_tail(tiny, tmp_path, memory):
    """After the first save a turn appends only what it changed; a restart replays the journal exactly (with a
    memory too, whose blocks file grew since the whole state); a tail a crash left uncommitted is ignored and cut
    off; a damaged committed record breaks only its session."""
    roomy = dataclasses.replace(STREAM, window=400)  # a turn changes a small share of the cache
    if memory:  # the long first turn and each later one evict tokens into new blocks
        roomy = dataclasses.replace(MEMORY_STREAM, window=60)
    questions = [
        "tell me about rivers, " * 25,
        *QUESTIONS[1:],
    ]  # a long first turn (all fed), then short ones
    with _serve(tiny, history="exact", stream=roomy) as server:  # uninterrupted, nothing on disk
        _, reference = _turns(server.url, None, questions)
    with _serve(tiny, history="exact", stream=roomy, state_dir=tmp_path) as server:
        session, replies = _turns(server.url, None, questions[:3])
        assert replies == reference[:3]
    folder = tmp_path / "sessions" / session
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["generation"] == 3 and meta["state_file"] == "state-00000001.safetensors"  # one whole state,
    assert 0 < meta["journal"]["bytes"] < meta["state_bytes"]  # then two turns' records, smaller than it
    if memory:  # blocks were kept after the whole state was written
        own = json.loads(metadata((folder / meta["state_file"]).read_bytes())["state"])
        assert _blocks(meta["memory"]) > _blocks(own["memory"]) > 0
    journal_file = folder / meta["journal"]["file"]
    with open(journal_file, "ab") as f:
        f.write(b"\x07" * 100)  # a record torn by a crash before meta.json committed it
    with _serve(tiny, history="exact", stream=roomy, state_dir=tmp_path) as server:
        _, rest = _turns(server.url, session, questions[3:4])
        assert rest == reference[3:4]
    meta = json.loads((folder / "meta.json").read_text())
    if meta["journal"]["file"] == journal_file.name:  # appended after the torn tail was cut off
        assert journal_file.stat().st_size == meta["journal"]["bytes"]
    else:  # the journal had grown to the state's size: a whole state replaced both
        assert memory and not journal_file.exists()
        journal_file = folder / meta["journal"]["file"]
        with _serve(tiny, history="exact", stream=roomy, state_dir=tmp_path) as server:
            _turns(server.url, session, questions[4:])
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["journal"]["bytes"] > 0
    data = bytearray(journal_file.read_bytes())
    data[-5] ^= 0xFF
    journal_file.write_bytes(bytes(data))
    with _serve(tiny, history="exact", stream=roomy, state_dir=tmp_path) as server:
        broken = _chat(server.url, [{"role": "user", "content": "next"}], session=session)
        assert broken.status_code == 500 and broken.json()["error"]["code"] == "session_state_unusable"
        assert "journal record is corrupted" in broken.json()["error"]["message"]


def _blocks(memory: dict) -> int:
    return sum(int(layer["count"]) for layer in memory["layers"].values())


@pytest.mark.parametrize("history", ["window", "exact"])
def test_an_unmatched_long_history_enters_bounded_or_whole(tiny, history):
    """A history longer than the cache that matches no session: ``window`` feeds its first num_sinks and last
    window tokens, ``exact`` all of it; either way the session then continues it like any other."""
    with _serve(tiny) as server:  # where the conversation happened
        session, _ = _turns(server.url, None, QUESTIONS[:3])
        messages = []
        for question in QUESTIONS[:3]:
            messages.append({"role": "user", "content": question})
            reply = _chat(server.url, messages, max_tokens=4)
            messages.append(reply.json()["choices"][0]["message"])
        full = _state(server.url, reply.headers["x-session-id"])["tokens_seen"]
    assert full > STREAM.cache_size
    with _serve(tiny, history=history) as server:  # a fresh server: nothing matches
        first = _chat(server.url, [*messages, {"role": "user", "content": QUESTIONS[3]}], max_tokens=4)
        assert first.status_code == 200
        state = _state(server.url, first.headers["x-session-id"])
        fed = state["tokens_seen"] - first.json()["usage"]["completion_tokens"]
        if history == "window":  # the sinks and the last window of it
            assert fed == STREAM.cache_size == first.json()["usage"]["prompt_tokens"]
        else:
            assert fed == first.json()["usage"]["prompt_tokens"] > full
        resent = [*messages, {"role": "user", "content": QUESTIONS[3]}, first.json()["choices"][0]["message"]]
        second = _chat(server.url, [*resent, {"role": "user", "content": QUESTIONS[4]}], max_tokens=4)
        assert second.headers["x-session-id"] == first.headers["x-session-id"]  # matched by its whole text


def test_a_conversation_keeps_digests_not_text():
    """A session matches resent histories by the length and running sha256 of its text: a history that goes on
    from it gives what it adds, anything else gives None; the text itself is kept only until it is saved."""
    convo = Conversation.of("héllo ".encode(), [1, 2], turns=1)
    convo.extend(b"world", [3])
    assert convo.continued_by("héllo world, again") == ", again"
    assert convo.continued_by("héllo world") is None  # nothing added
    assert convo.continued_by("hello world, again") is None  # another history of the same length
    assert convo.continued_by("héllo") is None
    copy = convo.copy()
    convo.saved()
    assert not convo.unsaved_text and bytes(copy.unsaved_text) == "héllo world".encode()
    copy.extend(b"!", [4])
    assert convo.sha256 != copy.sha256 and convo.token_count == 3 and copy.token_count == 4
    assert not hasattr(convo, "text")
