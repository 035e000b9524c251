"""What ``GET /metrics`` exports, in Prometheus' text format: requests and errors, tokens, latency of tokens,
sessions and their bytes, waits for leases and the store, and decode batch sizes.

Each app owns its ``CollectorRegistry`` (several apps in one process, as in the tests, never share a series).
Every update goes through a guard: a metric that fails is logged once and skipped, so counting can never fail a
request that would have succeeded without it. Gauges of sessions are computed when scraped (``SessionGauges``)
on the event loop, the thread that changes the session table.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator

from fastapi import APIRouter
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import Response

log = logging.getLogger(__name__)

# From a fast local turn (tens of ms) to a long prompt on a loaded CPU (a minute).
# The text format every Prometheus reads (names here need no escaping, so it says all the newer one would).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Guard:
    """Runs metric updates so that a failing one is logged once (per name) and never raised to its caller."""

    def __init__(self) -> None:
        self._failed: set[str] = set()
        self._lock = threading.Lock()  # the model worker thread updates metrics too

    def run(self, name: str, update: Callable, *args) -> None:
        try:
            update(*args)
        except Exception:  # noqa: BLE001 - counted as failed and logged once, by design
            self.failed(name)

    def failed(self, name: str) -> None:
        with self._lock:
            first = name not in self._failed
            self._failed.add(name)
        if first:
            log.exception(
                "metrics: updating %s failed (the request goes on; later failures are not logged)", name
            )


def guarded(method: Callable) -> Callable:
    """A method of an object with a ``guard`` that never raises (see ``Guard``)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - counted as failed and logged once, by design
            self.guard.failed(method.__name__)
            return None

    return run


class Metrics:
    """One server app's metrics. Called from the routes, the access log, the session store and the scheduler."""

    def __init__(self) -> None:
        self.guard = Guard()
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "streamllm_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.errors = Counter(
            "streamllm_errors",
            "Requests that ended in an error, by its status (a streamed reply ending with an error event counts "
            "with that error's status, though its HTTP status was 200)",
            ["route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "streamllm_request_duration_seconds",
            "From a request's arrival to the end of its answer (a stream's last byte)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "streamllm_prompt_tokens",
            "Prompt tokens of turns that reached their first reply token, as `usage` reports them (the session's "
            "cached tokens included)",
            registry=r,
        )
        self.cached_tokens = Counter(
            "streamllm_prompt_cached_tokens",
            "Of those, tokens already in the session and not fed again",
            registry=r,
        )
        self.generated_tokens = Counter(
            "streamllm_generated_tokens", "Reply tokens generated (a turn undone later included)", registry=r
        )
        self.ttft = Histogram(
            "streamllm_time_to_first_token_seconds",
            "From a request's arrival to its first reply token: queueing, session load and prompt feed",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "streamllm_time_between_tokens_seconds",
            "Between one reply token and the next",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.lease_wait = Histogram(
            "streamllm_lease_wait_seconds",
            "Taking a session's lease in the store for a turn, including waiting while another process holds it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "streamllm_store_seconds",
            "Reading a session from the store (load) or committing a turn to it (save)",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "streamllm_decode_batch_size",
            "Sessions sharing one decode forward pass (with --batch-decode > 1)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

    # -- updates (each guarded) ------------------------------------------------------------------------------------
    @guarded
    def answered(self, route: str, method: str, status: int, error: int | None, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        if error is not None or status >= 400:
            self.errors.labels(route, str(error or status)).inc()
        self.duration.labels(route).observe(seconds)

    @guarded
    def token(self, access) -> None:
        """A reply token is out: the first one also counts the turn's prompt. Each series is updated on its own,
        so that one failing leaves the others (and the record's counts) right."""
        now, run = time.perf_counter(), self.guard.run
        if access.first_token is None:
            access.first_token = now
            run("time_to_first_token", self.ttft.observe, now - access.start)
            run("prompt_tokens", self.prompt_tokens.inc, access.prompt_tokens or 0)
            run("prompt_cached_tokens", self.cached_tokens.inc, access.cached_tokens or 0)
        else:
            run("time_between_tokens", self.itl.observe, now - access.last_token)
        access.last_token = now
        access.generated_tokens = (access.generated_tokens or 0) + 1
        run("generated_tokens", self.generated_tokens.inc)

    @guarded
    def lease_waited(self, seconds: float) -> None:
        self.lease_wait.observe(seconds)

    @guarded
    def store_op(self, operation: str, seconds: float) -> None:
        self.store_seconds.labels(operation).observe(seconds)

    @guarded
    def decode_batch(self, size: int) -> None:
        self.batch.observe(size)

    async def timed(self, events: AsyncGenerator, access) -> AsyncGenerator:
        """``events`` (a turn's), passed on as they come, each counted as a reply token of ``access``."""
        try:
            async for event in events:
                self.token(access)
                yield event
        finally:
            await events.aclose()

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/metrics", self.scrape, methods=["GET"], include_in_schema=False)
        return r

    async def scrape(self) -> Response:
        # On the event loop, deliberately: the session gauges read the session table, which only it changes.
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)


class SessionGauges:
    """Gauges of a ``SessionStore``, read when scraped: sessions in RAM and in the store, and their bytes."""

    def __init__(self, store, guard: Guard):
        self.store, self.guard = store, guard

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._gauges()
        except Exception:  # noqa: BLE001 - a scrape without these gauges beats a failed scrape
            self.guard.failed("session gauges")

    def _gauges(self) -> list[Metric]:
        sessions = list(self.store.sessions.values())
        resident = [s for s in sessions if s.loaded]
        cache = sum(s.stream.cache_bytes() for s in resident)
        ram = disk = 0
        for s in resident:
            memory = s.stream.memory
            if memory is not None:
                # The worker may be changing this stream's memory now: its counters are only read.
                stats = memory.stats()
                ram, disk = ram + stats["ram_bytes"], disk + stats["disk_bytes"]
        memory = GaugeMetricFamily(
            "streamllm_memory_bytes", "The memory's recalled blocks of resident sessions", labels=["where"]
        )
        memory.add_metric(["ram"], ram)
        memory.add_metric(["disk"], disk)
        return [
            GaugeMetricFamily(
                "streamllm_sessions_resident", "Sessions holding their cache in RAM", value=len(resident)
            ),
            GaugeMetricFamily(
                "streamllm_sessions_stored",
                "Sessions saved in the store that this process knows of (all at start-up, then those it served "
                "or found since)",
                value=sum(1 for s in sessions if s.generation > 0),
            ),
            GaugeMetricFamily(
                "streamllm_cache_bytes", "Key/value cache tensors of resident sessions", value=cache
            ),
            memory,
        ]


def labelled(texts: Iterable[tuple[str, str]], label: str = "replica") -> list[Metric]:
    """Metric families from several expositions (``(value of label, text)``), each sample labelled with where
    it came from, and families of one name merged (a name may appear once in an exposition)."""
    merged: dict[str, Metric] = {}
    for value, text in texts:
        for family in text_string_to_metric_families(text):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                into.samples.append(sample._replace(labels={**sample.labels, label: value}))
    return list(merged.values())


class Families:
    """A collector of fixed families (for rendering already collected ones with ``generate_latest``)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def exposition(*collectors) -> bytes:
    """The Prometheus text of the collectors' metrics, together."""
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)


class RouterMetrics:
    """The metrics of the ``serve-ray`` router itself: what it forwarded, and how its scrapes of replicas went."""

    def __init__(self) -> None:
        self.guard = Guard()
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "streamllm_router_requests",
            "Requests forwarded to a replica",
            ["route", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "streamllm_router_request_duration_seconds",
            "From a request's arrival at the router to the end of the replica's answer",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "streamllm_router_retries", "Requests sent again because their replica failed first", registry=r
        )
        self.scrape_failures = Counter(
            "streamllm_router_replica_scrape_failures",
            "Replicas whose /metrics did not answer a scrape of the router",
            registry=r,
        )

    @guarded
    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route).observe(seconds)

    @guarded
    def retried(self) -> None:
        self.retries.inc()

    @guarded
    def scrape_failed(self) -> None:
        self.scrape_failures.inc()
