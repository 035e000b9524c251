"""``GET /metrics`` and the access log: counters move by exactly what a conversation's ``usage`` says, a scrape in
the middle of a stream leaves the stream whole, a broken metric never fails a request, and ``--log-format json``
writes one JSON object per line. Servers run in this process (the tiny model), except one real ``serve``."""

import json
import logging

import httpx
import openai
import pytest
from conftest import SERVER_ARGS
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import KEY_A, MODEL, ServerProcess, ThreadServer

from streamllm import StreamConfig
from streamllm.server import ServerConfig, create_app
from streamllm.server.access import ROUTES, route_of
from streamllm.server.logs import JsonFormatter
from streamllm.server.metrics import Families, exposition, labelled

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAM = StreamConfig(num_sinks=4, window=28, chunk_size=16)
CHAT = "/v1/chat/completions"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _app(tiny, **overrides):
    model, tokenizer = tiny
    settings = {
        "model_id": "tiny",
        "stream": STREAM,
        "api_keys": (KEY,),
        "max_tokens_limit": 4000,
    } | overrides
    return create_app(model, tokenizer, ServerConfig(**settings))


def _scrape(url: str, headers=AUTH) -> dict:
    """{(sample name, sorted labels): value} of one scrape."""
    reply = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_counters_move_by_what_usage_says(tiny, tmp_path):
    with ThreadServer(_app(tiny, state_dir=tmp_path)) as server:
        client = _client(server.url)
        history = [{"role": "user", "content": "hello there"}]
        before = _scrape(server.url)
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=history, temperature=0, max_tokens=5
        )
        first, session = raw.parse(), raw.headers["x-session-id"]
        after = _scrape(server.url)
        usage = first.usage
        ok = {"route": CHAT, "method": "POST", "status": "200"}
        assert _delta(before, after, "streamllm_requests_total", **ok) == 1
        assert _delta(before, after, "streamllm_prompt_tokens_total") == usage.prompt_tokens
        assert _delta(before, after, "streamllm_generated_tokens_total") == usage.completion_tokens
        assert _delta(before, after, "streamllm_time_to_first_token_seconds_count") == 1
        assert (
            _delta(before, after, "streamllm_time_between_tokens_seconds_count")
            == usage.completion_tokens - 1
        )
        assert _delta(before, after, "streamllm_request_duration_seconds_count", route=CHAT) == 1
        # The first turn saves a whole state, under the lease it took; every generated token was fed alone.
        assert _delta(before, after, "streamllm_store_seconds_count", operation="save") == 1
        assert _delta(before, after, "streamllm_lease_wait_seconds_count") == 1
        assert _delta(before, after, "streamllm_decode_batch_size_count") == usage.completion_tokens
        assert _delta(before, after, "streamllm_decode_batch_size_sum") == usage.completion_tokens
        assert (
            _value(after, "streamllm_sessions_resident") == 1
            and _value(after, "streamllm_sessions_stored") == 1
        )
        assert _value(after, "streamllm_cache_bytes") > 0

        # The next turn, streamed, names its session: the cached tokens are the first turn's.
        history += [{"role": "assistant", "content": first.choices[0].message.content}]
        history += [{"role": "user", "content": "and then?"}]
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=history[-1:],
                temperature=0,
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Session-Id": session},
            )
        )
        again = _scrape(server.url)
        usage = chunks[-1].usage
        assert usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens
        assert _delta(after, again, "streamllm_requests_total", **ok) == 1
        assert _delta(after, again, "streamllm_prompt_tokens_total") == usage.prompt_tokens
        assert (
            _delta(after, again, "streamllm_prompt_cached_tokens_total")
            == usage.prompt_tokens_details.cached_tokens
        )
        assert _delta(after, again, "streamllm_generated_tokens_total") == usage.completion_tokens
        assert _delta(after, again, "streamllm_time_to_first_token_seconds_count") == 1
        assert _delta(after, again, "streamllm_errors_total", route=CHAT, status="200") == 0

        # Errors count by route and status; a session id in a path is named by its route.
        missing = httpx.get(f"{server.url}/v1/sessions/{'x' * 32}", headers=AUTH)
        assert missing.status_code == 404
        last = _scrape(server.url)
        route = "/v1/sessions/{session_id}"
        assert _delta(again, last, "streamllm_errors_total", route=route, status="404") == 1
        assert _delta(again, last, "streamllm_requests_total", route=route, method="GET", status="404") == 1


def test_metrics_need_the_key_unless_public(tiny):
    with ThreadServer(_app(tiny)) as server:
        refused = httpx.get(f"{server.url}/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert (
            httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        counted = _scrape(server.url)
        assert _value(counted, "streamllm_requests_total", route="/metrics", method="GET", status="401") == 2
    with ThreadServer(_app(tiny, metrics_public=True)) as server:
        assert "streamllm_requests_total" in httpx.get(f"{server.url}/metrics").text
        assert httpx.get(f"{server.url}/v1/models").status_code == 401  # nothing else opens
    with ThreadServer(_app(tiny, api_keys=())) as server:  # a server without keys: nothing to ask for
        assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_a_scrape_during_a_stream_leaves_it_whole_and_logs_it_at_its_end(tiny, caplog):
    caplog.set_level(logging.INFO, logger="streamllm.access")
    with ThreadServer(_app(tiny)) as server:
        before = _scrape(server.url)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 300}
        body |= {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", f"{server.url}{CHAT}", json=body, headers=AUTH, timeout=120) as reply:
            lines = reply.iter_lines()
            for line in lines:  # up to the first token
                if line.startswith("data: ") and '"content": ""' not in line:
                    events.append(line)
                    break
            during = _scrape(server.url)
            assert _value(during, "streamllm_sessions_resident") == 1
            assert _delta(before, during, "streamllm_time_to_first_token_seconds_count") == 1
            assert not [r for r in caplog.records if getattr(r, "access", {}).get("route") == CHAT]
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        assert usage["completion_tokens"] == 300
        after = _scrape(server.url)
        assert _delta(before, after, "streamllm_generated_tokens_total") == 300
        lines = [r.access for r in caplog.records if getattr(r, "access", {}).get("route") == CHAT]
        assert len(lines) == 1
        assert lines[0]["status"] == 200 and lines[0]["generated_tokens"] == 300
        assert lines[0]["prompt_tokens"] == usage["prompt_tokens"] and lines[0]["session"]


def test_a_failing_metric_never_fails_a_request_and_is_logged_once(tiny, caplog):
    app = _app(tiny)

    def broken(*_):
        raise RuntimeError("a bug in a metric")

    app.state.metrics.ttft.observe = broken
    app.state.metrics.batch.observe = broken  # on the model worker thread
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with ThreadServer(app) as server:
        for stream in (False, True, False):
            reply = httpx.post(
                f"{server.url}{CHAT}", json=chat | {"stream": stream}, headers=AUTH, timeout=120
            )
            assert reply.status_code == 200
            assert "[DONE]" in reply.text if stream else reply.json()["usage"]["completion_tokens"] == 3
        samples = _scrape(server.url)  # the other series are whole
        assert _value(samples, "streamllm_generated_tokens_total") == 9
        assert _value(samples, "streamllm_time_between_tokens_seconds_count") == 6
    failures = [r for r in caplog.records if r.name == "streamllm.server.metrics"]
    assert len(failures) == 2 and all(r.exc_info for r in failures)  # one per broken metric, not per call
    assert {"time_to_first_token", "decode_batch"} == {r.args[0] for r in failures}


def test_json_log_lines_carry_the_access_fields(tiny, caplog):
    caplog.set_level(logging.INFO, logger="streamllm.access")
    with ThreadServer(_app(tiny)) as server:
        reply = httpx.post(
            f"{server.url}{CHAT}",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers=AUTH,
        )
        httpx.get(f"{server.url}/v1/models")  # no key: a 401, logged too
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "streamllm.access"]
    chat = next(line for line in lines if line["route"] == CHAT)
    assert chat["method"] == "POST" and chat["status"] == 200 and chat["logger"] == "streamllm.access"
    assert chat["session"] == reply.headers["x-session-id"]
    assert chat["prompt_tokens"] == reply.json()["usage"]["prompt_tokens"] and chat["generated_tokens"] == 2
    assert chat["seconds"] > 0 and chat["level"] == "INFO" and chat["message"].startswith(f"POST {CHAT} 200")
    refused = next(line for line in lines if line["route"] == "/v1/models")
    assert refused["status"] == 401 and refused["session"] is None


def _paths(routes):
    for route in routes:
        if hasattr(route, "original_router"):  # newer FastAPI keeps an included router whole
            yield from _paths(route.original_router.routes)
        else:
            yield route.path


def test_every_route_is_its_own_label(tiny):
    assert set(_paths(_app(tiny).routes)) - {"/openapi.json"} == set(ROUTES)
    assert route_of("/v1/sessions/abc") == "/v1/sessions/{session_id}"
    assert route_of("/wp-login.php") == route_of("/v1/sessions/a/b") == "other"


def test_replica_expositions_merge_with_a_replica_label():
    text = (
        "# HELP streamllm_generated_tokens_total Reply tokens\n# TYPE streamllm_generated_tokens_total counter\n"
        "streamllm_generated_tokens_total 3.0\n"
    )
    merged = exposition(
        Families(labelled([("r1@h:1", text), ("r2@h:2", text.replace("3.0", "4.0"))]))
    ).decode()
    assert merged.count("# TYPE streamllm_generated_tokens_total counter") == 1
    samples = {
        s.labels["replica"]: s.value for f in text_string_to_metric_families(merged) for s in f.samples
    }
    assert samples == {"r1@h:1": 3.0, "r2@h:2": 4.0}


@pytest.mark.real
def test_a_real_server_logs_json_lines_and_serves_public_metrics(tmp_path):
    log = tmp_path / "server.log"
    args = [*SERVER_ARGS, "--api-key", KEY_A, "--log-format", "json", "--metrics-public"]
    server = ServerProcess(args, log)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY_A, max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=4, temperature=0
        )
        samples = _scrape(server.url, headers={})  # no key needed
        assert _value(samples, "streamllm_generated_tokens_total") == reply.usage.completion_tokens
    finally:
        server.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    chat = [line for line in lines if line.get("route") == CHAT]
    assert len(chat) == 1 and chat[0]["generated_tokens"] == reply.usage.completion_tokens
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines are JSON too


class _Replicas:
    """A stand-in for the router's handle on its replicas: each answers /metrics with its own text, or fails."""

    def __init__(self, texts: dict):
        self.texts, self.calls = texts, []

    def options(self, **_):
        return self

    def remote(self, key, method, path, query, headers, body):
        self.calls.append((key, method, path, dict(headers).get("authorization")))
        return self._answer(key.removeprefix("replica:"))

    async def _answer(self, replica_id):
        text = self.texts.get(replica_id)
        if text is None:
            raise RuntimeError("the replica died")
        yield 200, [("content-type", "text/plain"), ("x-streamllm-replica", f"{replica_id}@host:1")]
        yield text.encode()


def _router(monkeypatch, texts, **options):
    """The ``serve-ray`` router's class itself (no Ray cluster), its replicas ``texts``."""
    ray_serve = pytest.importorskip("streamllm.server.ray_serve")
    monkeypatch.setattr(ray_serve, "configure", lambda _: None)  # leaves this process's logging alone
    monkeypatch.setattr(ray_serve, "running_replicas", frozenset(texts))
    mine = next(
        c for c in ray_serve.Router.func_or_class.__mro__ if "scrape" in vars(c)
    )  # the class as written, under Serve's wrapper
    replicas = _Replicas(texts)
    return mine(replicas, 1000, api_keys=(KEY,), **options), replicas


def _get(router, headers: dict):
    import asyncio

    from starlette.requests import Request

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": raw, "query_string": b""}
    return asyncio.run(router.scrape(Request(scope)))


def test_the_router_gathers_every_replicas_metrics(monkeypatch):
    counter = "# TYPE streamllm_generated_tokens_total counter\nstreamllm_generated_tokens_total {}\n"
    texts = {"a": counter.format(3), "b": counter.format(4), "gone": None}
    router, replicas = _router(monkeypatch, texts)
    assert _get(router, {}).status_code == 401 and not replicas.calls  # the replicas are not even asked
    answer = _get(router, AUTH)
    assert answer.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(answer.body.decode())
        for s in f.samples
    }
    assert _value(samples, "streamllm_generated_tokens_total", replica="a@host:1") == 3
    assert _value(samples, "streamllm_generated_tokens_total", replica="b@host:1") == 4
    assert _value(samples, "streamllm_router_replica_scrape_failures_total") == 1  # "gone" is left out
    labels = {"route": "/metrics", "method": "GET", "status": "401"}
    assert _value(samples, "streamllm_router_requests_total", **labels) == 1
    # Each replica was asked by its own key, with the caller's key passed on.
    assert sorted(replicas.calls) == [
        (f"replica:{r}", "GET", "/metrics", AUTH["Authorization"]) for r in sorted(texts)
    ]
    public, _ = _router(monkeypatch, {"a": counter.format(3)}, metrics_public=True)
    assert _get(public, {}).status_code == 200


def test_a_replica_key_goes_to_that_replica_or_any_when_it_is_gone():
    import asyncio
    from types import SimpleNamespace

    ray_serve = pytest.importorskip("streamllm.server.ray_serve")
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=i)) for i in ("a", "b", "c")]

    def choose(key):
        pending = SimpleNamespace(args=(key,), created_at=0.0)
        chosen = asyncio.run(ray_serve.SessionAffinity.choose_replicas(None, replicas, pending))
        return [[r.replica_id.unique_id for r in rank] for rank in chosen]

    assert choose("replica:b") == [["b"]]
    assert choose("replica:gone") == [["a", "b", "c"]]  # the router then sees who answered, and leaves it out


def test_an_unexpected_error_counts_as_the_500_it_becomes(tiny, monkeypatch):
    from streamllm.server.routes import Api

    async def crash(self):
        raise RuntimeError("a bug in a route")

    monkeypatch.setattr(Api, "models", crash)
    with ThreadServer(_app(tiny)) as server:
        assert httpx.get(f"{server.url}/v1/models", headers=AUTH).status_code == 500
        samples = _scrape(server.url)
    assert _value(samples, "streamllm_requests_total", route="/v1/models", method="GET", status="500") == 1
    assert _value(samples, "streamllm_errors_total", route="/v1/models", status="500") == 1
