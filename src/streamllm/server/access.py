"""One log line and one count per request, written when its answer has ended: for a streamed reply that is after
its last token, so the line carries the reply's token counts and the stream's whole duration.

The line goes to the ``streamllm.access`` logger with its fields as ``extra={"access": {...}}``, which
``logs.JsonFormatter`` writes as JSON keys.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from .metrics import Metrics

log = logging.getLogger("streamllm.access")

# The routes, as labels: a path is named by its route, so session ids and scanners' paths never become series.
ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/sessions",
    "/v1/sessions/{session_id}",
    "/",
    "/ui/app.js",
    "/ui/recalls.js",
    "/ui/style.css",
    "/favicon.ico",
)
_PATTERNS = [(re.compile(re.sub(r"\{[a-z_]+\}", "[^/]+", r) + "$"), r) for r in ROUTES]
CLOSED_BY_CLIENT = 499  # no answer was started: the client went away first (nginx's status for it)


def route_of(path: str) -> str:
    """The route ``path`` belongs to, or "other"."""
    return next((route for pattern, route in _PATTERNS if pattern.match(path)), "other")


@dataclass
class Access:
    """What one request did, filled in as it goes (the routes add its session and tokens)."""

    method: str
    path: str
    start: float  # time.perf_counter()
    status: int | None = None
    session: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    generated_tokens: int | None = None
    error: int | None = None  # the status of an error sent inside a streamed body
    first_token: float | None = None
    last_token: float | None = None

    def began(self, session: str, prompt_tokens: int, cached_tokens: int) -> None:
        """The request's turn: its session, and its prompt as ``usage`` counts it."""
        self.session, self.prompt_tokens, self.cached_tokens = session, prompt_tokens, cached_tokens

    def fields(self, route: str, seconds: float) -> dict:
        return {
            "method": self.method,
            "route": route,
            "path": self.path,
            "status": self.status,
            "error": self.error,
            "session": self.session,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "seconds": round(seconds, 4),
        }


def log_line(fields: dict) -> None:
    """The access line: ``POST /v1/chat/completions 200 session=... prompt_tokens=... seconds=...``; the
    fields, those that are set, also go along as ``record.access``."""
    named = " ".join(
        f"{k}={v}"
        for k, v in fields.items()
        if k not in ("method", "path", "status", "route") and v is not None
    )
    log.info(
        "%s %s %s %s", fields["method"], fields["path"], fields["status"], named, extra={"access": fields}
    )


class AccessLog:
    """ASGI middleware (the outermost): times each HTTP request, hands the routes an ``Access`` record in
    ``scope["state"]["access"]``, and when the answer has ended, counts it and writes its log line."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        access = Access(scope["method"], scope["path"], time.perf_counter())
        scope.setdefault("state", {})["access"] = access
        headers = dict(scope.get("headers") or [])
        access.session = headers.get(b"x-session-id", b"").decode("latin-1")[:128] or None

        async def watched(message):
            if message["type"] == "http.response.start":
                access.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            # An unexpected error passes through here on its way to Starlette's outermost handler, which answers 500.
            if access.status is None:
                access.status = 500
            raise
        finally:
            self._done(access)

    def _done(self, access: Access) -> None:
        try:
            if access.status is None:
                access.status = CLOSED_BY_CLIENT if access.error is None else 500
            seconds = time.perf_counter() - access.start
            route = route_of(access.path)
            self.metrics.answered(route, access.method, access.status, access.error, seconds)
            log_line(access.fields(route, seconds))
        except Exception:  # noqa: BLE001 - the answer is out; a failed log line must not turn into an error
            self.metrics.guard.failed("the access log")
