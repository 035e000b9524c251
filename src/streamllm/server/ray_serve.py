"""Replicas of the server on Ray Serve (``streamllm serve-ray``), sharing one session store.

Two deployments:

- **Replica** (N of them): the whole single-process server (``create_app``: its sessions, scheduler, batching,
  limits and keys), built as ``streamllm serve`` builds its own and driven through a small ASGI bridge.
  Its sessions live in the shared store (``--store``, or ``--state-dir`` when every replica is on one machine),
  so any replica can serve any turn (``sessions.py``: a turn runs under the session's lease, and a replica whose
  copy in memory is older than the store's reloads it).
- **Router** (the HTTP ingress): forwards each request to a replica and streams the answer back. It picks the
  replica by **session affinity**: the request's key is its ``X-Session-Id``, or, for a request that names no
  session (a resent history), a digest of its API key and its first message, which every turn of that
  conversation repeats. ``SessionAffinity`` ranks the replicas by rendezvous hashing of the key (the highest
  ``sha256(key, replica)`` first), so a session's turns go to one replica for as long as it lives, without any
  shared table; when that replica dies or is busy, the next one in the ranking takes the turn, restoring the
  session from the store. A session id first seen in an answer is routed like the request that created it.

Affinity is only for speed: a turn sent to another replica is still correct, it pays for a reload (measured in
``benchmarks/load.py``). Ray is imported here only: the single-process server does not need it.

**Metrics.** Replicas have no port of their own, so the router's ``GET /metrics`` is the one scrape target: its
own series (``streamllm_router_*``) and every running replica's ``/metrics``, fetched at scrape time through the
replica's own route (a request keyed ``replica:<id>``, which ``SessionAffinity`` sends to exactly that replica),
each sample labelled ``replica="<id>@<host>:<pid>"``.
"""

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RunningReplica

from .access import log_line, route_of
from .config import ModelChoice, ServerConfig, store_password
from .errors import AUTHENTICATION, SERVER_ERROR, error_body
from .guards import bearer_key
from .logs import configure
from .metrics import CONTENT_TYPE, Families, RouterMetrics, exposition, labelled

log = logging.getLogger(__name__)

HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
REPLICA_HEADER = "x-streamllm-replica"  # which replica answered (id@host:pid): for operators and tests
REPLICA_KEY = "replica:"  # an affinity key naming one replica: the router's scrape of its /metrics
SCRAPE_TIMEOUT_S = 10.0


def affinity_key(method: str, path: str, headers: dict[str, str], body: bytes) -> str:
    """The key a request is routed by: its session, or its conversation's first message; "" for neither."""
    session = headers.get("x-session-id", "").strip()
    if session:
        return f"session:{session}"
    if method != "POST" or not path.endswith("completions"):
        return ""
    try:
        request = json.loads(body)
        first = request["messages"][0]["content"] if "messages" in request else request["prompt"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    digest = hashlib.sha256()
    digest.update(headers.get("authorization", "").encode())
    digest.update(b"\0" + json.dumps(first, sort_keys=True)[:4096].encode())
    return f"conversation:{digest.hexdigest()}"


def rank(key: str, replica_ids: list[str]) -> list[str]:
    """Rendezvous hashing: the replicas in the order a key prefers them (stable as replicas come and go)."""
    return sorted(replica_ids, key=lambda r: hashlib.sha256(f"{key}\0{r}".encode()).digest(), reverse=True)


# The ids of the running replicas, as Ray last told ``SessionAffinity``. Ray creates that router itself, in the
# process of the deployment that holds the handle (``Router``), so a module global is how ``Router`` reads them;
# one assignment replaces it whole, as Ray may call from another thread.
running_replicas: frozenset[str] = frozenset()


def _imported():
    """This module as imported in this process. Ray sends ``SessionAffinity`` and ``Router`` to their process by
    value, each with its own copy of this module's globals, so the state they share lives in the imported one."""
    from streamllm.server import ray_serve

    return ray_serve


class SessionAffinity(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's router, except that a request with an affinity key (its first argument) goes to the replica
    its key ranks first. Ray asks again, with backoff, while the chosen replica does not confirm that it has
    room (on a loaded machine its answer can take longer than Ray waits for it); only after ``STICKY_S`` of that
    may the others, in the key's order, take the request. A dead replica leaves the candidates at once."""

    STICKY_S = 30.0

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        _imported().running_replicas = frozenset(r.replica_id.unique_id for r in replicas)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.args[0] if pending_request is not None and pending_request.args else ""
        if not key or not candidate_replicas or pending_request is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if key.startswith(REPLICA_KEY):  # that one; if it is gone, any (the router sees who answered)
            named = by_id.get(key.removeprefix(REPLICA_KEY))
            return [[named]] if named is not None else [list(candidate_replicas)]
        ranked = [[by_id[i]] for i in rank(key, list(by_id))]
        if time.time() - pending_request.created_at < self.STICKY_S:
            return ranked[:1]
        return ranked


# The ignore: Ray's config model types its keyword arguments as dicts, though the field takes a class (or the
# class's import path).
@serve.deployment(
    request_router_config=RequestRouterConfig(request_router_class=SessionAffinity),  # type: ignore[arg-type]
    max_ongoing_requests=64,
    health_check_period_s=5,
)
class Replica:
    """One server process's app, built as ``streamllm serve`` builds its own (``app.load_server``) from the
    ``ModelChoice`` and ``ServerConfig`` the command made once. The store's password is not in that config: it is
    read here from ``password_file`` or the environment, so that it never travels through Ray. Its lifespan (the
    model worker, the store) starts with its first request and ends with the process: it holds no lease between
    turns, and a turn cut off by the replica's end is never committed."""

    def __init__(
        self,
        choice: ModelChoice,
        config: ServerConfig,
        log_format: str = "text",
        password_file: Path | None = None,
    ):
        from .app import create_app, load_server

        configure(log_format)
        if config.store is not None:
            config = replace(config, store_password=store_password(password_file))
        model, tokenizer, config = load_server(choice, config)
        self.app = create_app(model, tokenizer, config)
        self.name = f"{serve.get_replica_context().replica_id.unique_id}@{socket.gethostname()}:{os.getpid()}"
        self._lifespan: AbstractAsyncContextManager | None = None
        self._started = asyncio.Lock()

    async def _start(self) -> None:
        async with self._started:
            if self._lifespan is None:
                lifespan = self.app.router.lifespan_context(self.app)
                await lifespan.__aenter__()
                self._lifespan = lifespan

    async def __call__(
        self, key: str, method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator:
        """Run one HTTP request through the app: yields (status, headers) first, then the body's chunks."""
        await self._start()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.create_task(self.app(scope, receive, messages.put))
        try:
            while True:
                get = asyncio.ensure_future(messages.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    task.result()  # the app ended without finishing its answer: raise what it raised
                    raise RuntimeError("the app ended without an answer")
                message = get.result()
                if message["type"] == "http.response.start":
                    sent = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                    yield message["status"], [*sent, (REPLICA_HEADER, self.name)]
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
        finally:
            gone.set()  # the caller went away (or the answer is complete): the app sees a disconnect
            await asyncio.gather(task, return_exceptions=True)


ingress = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


# Ray asks a replica whether it has room before sending it a request and backs off when the answer takes longer
# than this (0.1 s by default). A replica busy with a model step on a loaded machine often answers later, and
# with session affinity there is no other replica to try, so the router waits longer for the answer.
PROBE_DEADLINE = {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0"}


@serve.deployment(
    ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": PROBE_DEADLINE}}, max_ongoing_requests=1000
)
@serve.ingress(ingress)
class Router:
    """The HTTP front: every request goes whole to one replica, chosen by ``affinity_key``; ``/metrics`` gathers
    the replicas' (needing one of ``api_keys``, when there are any, unless ``metrics_public``)."""

    def __init__(
        self,
        replicas,
        max_body_bytes: int,
        retry_s: float = 60.0,
        api_keys: tuple[str, ...] = (),
        metrics_public: bool = False,
        log_format: str = "text",
    ):
        configure(log_format)
        self.replicas = replicas.options(stream=True)
        self.max_body_bytes, self.retry_s = max_body_bytes, retry_s
        self.keys, self.metrics_public = [k.encode() for k in api_keys], metrics_public
        self.aliases: OrderedDict[str, str] = OrderedDict()  # session id -> the key that created it
        self.metrics = RouterMetrics()

    # Before the catch-all route below, which would forward it to one replica.
    @ingress.get("/metrics", include_in_schema=False)
    async def scrape(self, request: Request):
        start = time.perf_counter()
        header = request.headers.get("authorization", "").encode("latin-1")
        if not self.metrics_public and bearer_key(header, self.keys) is False:
            answer: Response = JSONResponse(
                error_body("missing or incorrect API key", AUTHENTICATION, code="invalid_api_key"),
                status_code=401,
                headers={"www-authenticate": "Bearer"},
            )
        else:
            texts = await self._replica_metrics(list(request.headers.items()))
            answer = Response(
                exposition(self.metrics.registry, Families(labelled(texts))), media_type=CONTENT_TYPE
            )
        self._answered("GET", "/metrics", answer.status_code, None, start)
        return answer

    async def _replica_metrics(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """(replica name, its /metrics text) of every running replica that answers in time."""
        # Ray tells the router its replicas with the first request it routes
        if not _imported().running_replicas:
            answer, _ = await self._first(("", "GET", "/health", b"", headers, b""))
            async for _ in answer:
                pass
        ids = sorted(_imported().running_replicas)
        results = await asyncio.gather(*(self._scrape(i, headers) for i in ids), return_exceptions=True)
        texts = []
        for replica_id, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("replica %s: /metrics did not answer (%s)", replica_id, result)
                self.metrics.scrape_failed()
            else:
                texts.append(result)
        return texts

    async def _scrape(self, replica_id: str, headers: list[tuple[str, str]]) -> tuple[str, str]:
        async with asyncio.timeout(SCRAPE_TIMEOUT_S):
            answer = self.replicas.remote(REPLICA_KEY + replica_id, "GET", "/metrics", b"", headers, b"")
            status, sent = await answer.__anext__()
            body = b"".join([chunk async for chunk in answer])
        name = dict(sent).get(REPLICA_HEADER, "")
        if status != 200 or not name.startswith(f"{replica_id}@"):
            raise RuntimeError(f"answered {status} from {name or 'an unnamed replica'}")
        return name, body.decode()

    @ingress.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"])
    async def forward(self, request: Request, path: str):
        start = time.perf_counter()
        received = bytearray()
        async for part in request.stream():
            received += part
            # the replica would refuse it too; do not hold it all here
            if len(received) > self.max_body_bytes:
                self._answered(request.method, request.url.path, 413, None, start)
                return JSONResponse(
                    error_body(f"request body over {self.max_body_bytes} bytes", "invalid_request_error"),
                    status_code=413,
                )
        body = bytes(received)
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = affinity_key(request.method, request.url.path, headers, body)
        key = self.aliases.get(key.removeprefix("session:"), key) if key.startswith("session:") else key
        call = (
            key,
            request.method,
            request.url.path,
            request.url.query.encode(),
            list(headers.items()),
            body,
        )
        answer, (status, sent) = await self._first(call)
        named = dict(sent).get("x-session-id")
        if named and not key.startswith("session:") and key:
            self.aliases[named] = key  # its next turns, which name it, go where it was made
            while len(self.aliases) > 100_000:
                self.aliases.popitem(last=False)
        session = named or headers.get("x-session-id")

        async def rest():
            try:
                async for chunk in answer:
                    yield chunk
            finally:  # the answer has ended (or its client went away): its line says how long it took
                self._answered(request.method, request.url.path, status, session, start)

        kept = {k: v for k, v in sent if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(rest(), status_code=status, headers=kept)

    def _answered(self, method: str, path: str, status: int, session: str | None, start: float) -> None:
        try:
            seconds, route = time.perf_counter() - start, route_of(path)
            self.metrics.answered(route, method, status, seconds)
            fields = {"method": method, "route": route, "path": path, "status": status, "session": session}
            log_line(fields | {"seconds": round(seconds, 4)})
        except Exception:  # noqa: BLE001 - the answer is out; a failed log line must not turn into an error
            self.metrics.guard.failed("the access log")

    async def _first(self, call):
        """Send the request, retrying while its replica is gone (killed, restarting) and nothing was answered."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.retry_s
        while True:
            answer = self.replicas.remote(*call)
            try:
                return answer, await answer.__anext__()
            except Exception as exc:  # noqa: BLE001 - Ray's errors for a dead replica vary by version
                if loop.time() >= give_up:
                    log.warning("no replica answered: %s", exc)
                    return _failed(exc)
                log.info("a replica failed before answering (%s); trying again", type(exc).__name__)
                self.metrics.retried()
                await asyncio.sleep(0.5)


def _failed(exc: BaseException):
    body = json.dumps(error_body(f"no replica could take the request ({type(exc).__name__})", SERVER_ERROR))

    async def one():
        yield body.encode()

    return one(), (503, [("content-type", "application/json")])


def application(
    choice: ModelChoice,
    config: ServerConfig,
    replicas: int,
    cpus_per_replica: float,
    log_format: str = "text",
    password_file: Path | None = None,
):
    """The Ray Serve application: ``replicas`` replicas of the server ``choice`` and ``config`` describe, behind one
    router, which reads the body limit and who may scrape ``/metrics`` from ``config`` too."""
    # The ignores: ``serve.deployment`` makes each class a ``Deployment``, but its typing leaves the class's type.
    replica = Replica.options(  # type: ignore[attr-defined]
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica}
    )
    return Router.bind(  # type: ignore[attr-defined]
        replica.bind(choice, config, log_format, password_file),
        config.max_body_bytes,
        api_keys=config.api_keys,
        metrics_public=config.metrics_public,
        log_format=log_format,
    )
