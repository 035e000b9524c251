"""``streamllm serve-ray``: two replicas of the real server on a local Ray cluster (one thread each), sharing a
real Redis, behind the session-affinity router; driven through the real openai client.

- Concurrent clients: every conversation gets the replies of an uninterrupted single server, and the store
  holds each of its turns exactly once.
- A session's turns stay on one replica. That replica is killed (SIGKILL) between turns: the next turn is served
  by the other one, restored from the store, with the same greedy replies as the uninterrupted run.
"""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import SERVER_ARGS
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import KEY_A, LIGHTHOUSE, MODEL, ServerProcess, ask

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'streamllm[ray]')")
pytestmark = pytest.mark.real

QUESTIONS = LIGHTHOUSE[:4]
REPLICA = "x-streamllm-replica"


def _wait_for_replicas(url: str, n: int, timeout: float = 300.0) -> None:
    """Until ``n`` replicas have answered: the router answers as soon as one is up, and a session started before
    the others were would move once they join (its key may rank a newcomer first)."""
    seen, end = set(), time.monotonic() + timeout
    while len(seen) < n:
        assert time.monotonic() < end, f"only {len(seen)} of {n} replicas came up"
        seen.add(httpx.get(f"{url}/health", timeout=30).headers[REPLICA])
        time.sleep(0.1)


def _conversation(url: str, questions, history=None, session=None):
    """Greedy turns of 12 tokens, history resent and session named. -> [(reply, session, replica)]"""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY_A, max_retries=0, timeout=300)
    history = [] if history is None else history
    out = []
    for question in questions:
        history.append({"role": "user", "content": question})
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=history,
            temperature=0,
            max_tokens=12,
            extra_headers={"X-Session-Id": session} if session else None,
        )
        reply = raw.parse().choices[0].message.content
        session = raw.headers["x-session-id"]
        history.append({"role": "assistant", "content": reply})
        out.append((reply, session, raw.headers[REPLICA]))
    return out


def _check_metrics(url: str) -> None:
    """The router's /metrics (with the key) holds every replica's series, each labelled with its replica."""
    assert httpx.get(f"{url}/metrics", timeout=60).status_code == 401
    reply = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    assert reply.status_code == 200
    requests = [
        s
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
        if s.name == "streamllm_requests_total"
    ]
    health = {s.labels["replica"] for s in requests if s.labels["route"] == "/health"}
    assert len(health) == 2  # both replicas answered the router's waits for them
    chats = [s.value for s in requests if s.labels["route"] == "/v1/chat/completions"]
    assert sum(chats) == 8  # 4 clients x 2 turns, each served once


def test_replicas_share_sessions_and_survive_a_killed_one(server, redis_server, tmp_path):
    reference, history = [], []
    for question in QUESTIONS:  # one uninterrupted server
        history.append({"role": "user", "content": question})
        reference.append(ask(server.url, history)[0])
        history.append({"role": "assistant", "content": reference[-1]})

    args = [*SERVER_ARGS, "--api-key", KEY_A, "--store", redis_server.url, "--lease-ttl", "3"]
    args += ["--batch-decode", "1", "--replicas", "2"]  # replies independent of the other clients' traffic
    ray = ServerProcess(args, tmp_path / "ray.log", command="serve-ray")
    try:
        _wait_for_replicas(ray.url, 2)
        with ThreadPoolExecutor(4) as pool:  # concurrent clients, each its own conversation
            runs = list(pool.map(lambda _: _conversation(ray.url, QUESTIONS[:2]), range(4)))
        sessions = {run[0][1] for run in runs}
        assert len(sessions) == 4
        client = redis_server.client()
        for run in runs:
            assert [reply for reply, _, _ in run] == reference[:2]
            assert {s for _, s, _ in run} == {run[0][1]}  # never forked
            assert len({r for _, _, r in run}) == 1  # every turn on one replica
            meta = json.loads(client.get(f"streamllm:s:{run[0][1]}:meta"))
            assert meta["turns"] == 2  # each turn stored once: none lost, none twice
        _check_metrics(ray.url)

        history: list[dict] = []
        first = _conversation(ray.url, QUESTIONS[:2], history)
        session, holder = first[-1][1], first[-1][2]
        assert [r for r, _, _ in first] == reference[:2] and first[0][2] == holder
        os.kill(int(holder.rsplit(":", 1)[1]), signal.SIGKILL)  # the replica holding the session dies
        rest = _conversation(ray.url, QUESTIONS[2:], history, session)
        assert [r for r, _, _ in rest] == reference[2:]
        assert all(s == session for _, s, _ in rest)
        assert rest[0][2] != holder  # served by the other replica, from the store
        meta = json.loads(client.get(f"streamllm:s:{session}:meta"))
        assert meta["turns"] == len(QUESTIONS)
    finally:
        ray.stop()
