"""ASGI middleware that runs before any route: the API key check and the request body limit.

Both are plain ASGI (no buffering of responses), so streamed replies pass through untouched.
"""

from __future__ import annotations

import hmac
import json

from .config import ServerConfig, owner_of
from .errors import AUTHENTICATION, INVALID_REQUEST, error_body
from .page import PATHS as PAGE_PATHS

OPEN_PATHS = frozenset({"/health"}) | PAGE_PATHS


def bearer_key(header: bytes, keys: list[bytes]) -> str | None | bool:
    """The key an ``Authorization`` header carries: the matching one, None when no keys are configured, False
    when the header holds no valid key."""
    if not keys:
        return None
    scheme, _, token = header.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return False
    # Compare with every key, so the time taken does not tell which one nearly matched.
    matches = [hmac.compare_digest(token, key) for key in keys]
    return keys[matches.index(True)].decode() if any(matches) else False


async def _send_error(send, status: int, message: str, type: str, code: str, headers=()) -> None:
    body = json.dumps(error_body(message, type, None, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AuthGuard:
    """With API keys configured, every path but ``/health`` and the chat page's files (and ``/metrics`` with
    ``metrics_public``) needs ``Authorization: Bearer <key>``. The caller's owner id (a digest of the key) goes
    into ``scope["state"]["owner"]`` for the routes."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.keys = app, [key.encode() for key in config.api_keys]
        self.open = OPEN_PATHS | ({"/metrics"} if config.metrics_public else set())

    def _key(self, scope) -> str | None | bool:
        return bearer_key(dict(scope.get("headers") or []).get(b"authorization", b""), self.keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open:
            return await self.app(scope, receive, send)
        key = self._key(scope)
        if key is False:
            await _send_error(
                send,
                401,
                "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                AUTHENTICATION,
                "invalid_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        scope.setdefault("state", {})["owner"] = owner_of(key)
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse (413) a request body larger than ``max_body_bytes``, whether announced or streamed in chunks. The
    body is read here and handed on whole: the JSON routes parse it whole anyway."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.limit = app, config.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._too_large(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await _send_error(
            send,
            413,
            f"the request body is larger than this server's limit of {self.limit} bytes",
            INVALID_REQUEST,
            "request_too_large",
            [(b"connection", b"close")],
        )
