"""The session store behind one interface (``server/store.py``): the local folder and a real Redis, each shared
by two servers in this process (a tiny model; the real-model processes are ``test_server_shared.py``).

- Turns alternate between two servers on one store; each reply is the one an uninterrupted server gives, and
  a server whose copy in memory is older than the store's reloads it.
- A commit that follows an older state, or comes without the lease, is refused.
- Redis down: 503 with a clear message, nothing of the turn applied; once it is back, the same turn goes on as if
  nothing had happened.
- What is read from Redis is checked (the state's and the journal's digests), and the password shows nowhere.
"""

import json
import logging

import httpx
import pytest
from server_helpers import ThreadServer

from streamllm.config import StreamConfig
from streamllm.server import ServerConfig, create_app
from streamllm.server.persist import new_session_id
from streamllm.server.redis_store import RedisStore
from streamllm.server.store import LeaseLost

KEY, OTHER_KEY = "store-key", "another-store-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAM = StreamConfig(num_sinks=4, window=28, chunk_size=16)
QUESTIONS = ["first question", "second question, a little longer", "third", "fourth and last"]


# The servers here run in this process: one torch thread keeps them from fighting over the cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference(tiny):
    """The replies of one uninterrupted server with no store."""
    with _serve(tiny) as server:
        return [reply for reply, _ in _conversation([server] * len(QUESTIONS))]


def _serve(tiny, **overrides) -> ThreadServer:
    model, tokenizer = tiny
    settings = {"model_id": "tiny", "stream": STREAM, "api_keys": (KEY, OTHER_KEY)} | overrides
    return ThreadServer(create_app(model, tokenizer, ServerConfig(**settings)))


def _chat(url, messages, session=None, **params):
    headers = dict(AUTH, **({"X-Session-Id": session} if session else {}))
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 5} | params
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def _conversation(servers, history=None, session=None):
    """One turn per server in ``servers``, the history resent and the session named. -> [(reply, response)]"""
    history = [] if history is None else history
    out = []
    for server in servers:
        history.append({"role": "user", "content": QUESTIONS[len(history) // 2]})
        response = _chat(server.url, history, session)
        assert response.status_code == 200, response.text
        session = response.headers["x-session-id"]
        reply = response.json()["choices"][0]["message"]["content"]
        history.append({"role": "assistant", "content": reply})
        out.append((reply, response))
    return out


def _store(backend, redis_server, tmp_path) -> dict:
    if backend == "redis":
        return {"store": redis_server.url, "store_password": redis_server.PASSWORD, "lease_ttl_s": 2.0}
    return {"state_dir": tmp_path / "state"}


@pytest.fixture(params=["dir", "redis"])
def backend(request):
    if request.param == "redis":
        request.getfixturevalue("redis_server")
    return request.param


def test_two_servers_alternate_turns_on_one_store(tiny, reference, backend, tmp_path, request, caplog):
    redis_server = request.getfixturevalue("redis_server") if backend == "redis" else None
    store = _store(backend, redis_server, tmp_path)
    caplog.set_level(logging.INFO, logger="streamllm")
    with _serve(tiny, **store) as a, _serve(tiny, **store) as b:
        turns = _conversation([a, b, a, b])
        assert [reply for reply, _ in turns] == reference
        session = turns[0][1].headers["x-session-id"]
        assert {r.headers["x-session-id"] for _, r in turns} == {session}  # one session, never forked
        for _, response in turns[1:]:  # each server took the session from the store, not from the start
            assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert "was moved on elsewhere" in caplog.text  # A's copy was older than the store's
        with _serve(
            tiny, **store
        ) as c:  # a third server sees every turn, and only for the key that made them
            seen = httpx.get(f"{c.url}/v1/sessions/{session}", headers=AUTH).json()
            assert seen["turns"] == len(QUESTIONS) and not seen["in_memory"]
            other = {"Authorization": f"Bearer {OTHER_KEY}"}
            assert httpx.get(f"{c.url}/v1/sessions/{session}", headers=other).status_code == 404
            assert httpx.get(f"{c.url}/v1/sessions", headers=other).json()["data"] == []
            assert httpx.delete(f"{a.url}/v1/sessions/{session}", headers=AUTH).status_code == 200
            for server in (
                b,
                c,
            ):  # deleted by A: gone for B, which holds it in memory, and for C, which knew of it
                gone = _chat(server.url, [{"role": "user", "content": "again"}], session)
                assert gone.status_code == 404, gone.text
    if redis_server is not None:
        assert redis_server.PASSWORD not in caplog.text
        assert redis_server.PASSWORD not in repr(ServerConfig(model_id="x", **store))


def test_a_commit_after_an_older_state_or_without_the_lease_is_refused(redis_server):
    store = RedisStore(redis_server.url, redis_server.PASSWORD, "tiny", STREAM)
    try:
        session = new_session_id()
        lease = store.lease(session)
        assert lease is not None and store.lease(session) is None  # one holder at a time
        meta = store.write(session, None, {"id": session, "memory": None}, b"first state")
        assert meta["generation"] == 1 and store.generation(session) == 1
        with pytest.raises(LeaseLost, match="generation 1"):  # another first save: it would fork the session
            store.write(session, None, {"id": session, "memory": None}, b"a rival first state")
        lease.release()
        with pytest.raises(LeaseLost, match="lease"):  # committing without holding the lease
            store.write(session, meta, {"id": session, "memory": None}, b"second state")
        assert store.generation(session) == 1
        assert redis_server.client().get(f"streamllm:s:{session}:state") == b"first state"
        assert store.lease(session) is not None  # given back: free to take
    finally:
        store.close()


def test_the_folder_refuses_a_commit_after_an_older_state(tmp_path):
    from streamllm.server.statedir import StateDir

    store = StateDir(tmp_path, "tiny", STREAM)
    session = new_session_id()
    lease = store.lease(session)
    assert lease is not None and store.lease(session) is None  # one holder at a time (its flock)
    meta = store.write(session, None, {"id": session, "memory": None}, b"first state")
    assert meta["generation"] == 1 and store.generation(session) == 1
    with pytest.raises(LeaseLost, match="generation 1"):  # another first save: it would fork the session
        store.write(session, None, {"id": session, "memory": None}, b"a rival first state")
    lease.release()
    assert store.lease(session) is not None  # given back: free to take


def test_redis_down_answers_503_and_applies_nothing(tiny, reference, redis_server, tmp_path):
    store = _store("redis", redis_server, tmp_path)
    history: list[dict] = []
    with _serve(tiny, **store) as server:
        ((_, first),) = _conversation([server], history)
        session = first.headers["x-session-id"]
        redis_server.stop()
        history.append({"role": "user", "content": QUESTIONS[1]})
        down = _chat(server.url, history, session)
        assert down.status_code == 503, down.text
        error = down.json()["error"]
        assert error["code"] == "store_unavailable" and "cannot be reached" in error["message"]
        streamed = _chat(server.url, history, session, stream=True)
        assert "store_unavailable" in streamed.text and "[DONE]" not in streamed.text
        redis_server.start()  # its append-only file still holds the first turn
        history.pop()
        rest = _conversation([server] * (len(QUESTIONS) - 1), history, session)
    assert [first.json()["choices"][0]["message"]["content"], *(r for r, _ in rest)] == reference
    meta = json.loads(redis_server.client().get(f"streamllm:s:{session}:meta"))
    assert meta["turns"] == len(QUESTIONS)


def test_redis_state_and_journal_are_checked_before_use(tiny, redis_server, tmp_path):
    store = _store("redis", redis_server, tmp_path)
    sessions = {}
    with _serve(tiny, **store) as server:
        for name in ("state", "journal"):
            history: list[dict] = []
            turns = _conversation([server, server], history)  # a whole state, then a journal record
            sessions[name] = turns[0][1].headers["x-session-id"]
    client = redis_server.client()
    for name, session in sessions.items():
        key = f"streamllm:s:{session}:{name}"
        data = bytearray(client.get(key))
        data[len(data) // 2] ^= 0xFF
        client.set(key, bytes(data))
    with _serve(tiny, **store) as server:
        for name, needle in (("state", "corrupted"), ("journal", "corrupted")):
            broken = _chat(server.url, [{"role": "user", "content": "next"}], sessions[name])
            assert broken.status_code == 500, broken.text
            assert broken.json()["error"]["code"] == "session_state_unusable"
            assert needle in broken.json()["error"]["message"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--store", "redis://:hunter2@127.0.0.1:1/0"], "must not carry a password"),
        (["--store", "http://127.0.0.1:1/0"], "redis:// or rediss://"),
        (["--store", "redis://127.0.0.1:1/0", "--state-dir", "x"], "not both"),
        (["--store", "redis://127.0.0.1:1/0"], "cannot be reached"),
        (["--store", "redis://127.0.0.1:1/0", "--lease-ttl", "0.5"], "--lease-ttl must be >= 1"),
    ],
)
def test_bad_store_options_are_one_line_errors(args, needle, capsys):
    from streamllm.cli import main

    assert main(["serve", *args]) == 2  # the store is checked before the model loads
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert "hunter2" not in err


def test_a_wrong_store_password_is_a_one_line_error(redis_server, tmp_path, capsys):
    from streamllm.cli import main

    wrong = tmp_path / "password"
    wrong.write_text("not-the-password\n")
    assert main(["serve", "--store", redis_server.url, "--store-password-file", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and len(err.strip().splitlines()) == 1, err
    assert "not-the-password" not in err
