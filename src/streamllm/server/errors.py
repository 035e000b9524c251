"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a fitting status.

Bad input is always a 4xx naming what was wrong; only a failure of the server itself is a 500, and the server
goes on serving after it.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
TIMEOUT = "timeout_error"


class APIError(Exception):
    """An error a route reports to the client as it is."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def internal_error(exc: BaseException) -> APIError:
    # Retrying the same request would likely fail the same way: tell the openai client not to.
    return APIError(
        500,
        f"the server failed to process the request ({type(exc).__name__}: {exc})",
        SERVER_ERROR,
        code="internal_error",
        headers={"x-should-retry": "false"},
    )


def _param(loc: tuple) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages[0].content"``: pydantic's union member tags
    (``str``, ``function-after[...]``) are not parameter names and end the path."""
    text = None
    for part in loc[1:] if loc and loc[0] in ("body", "query", "header", "path") else loc:
        if isinstance(part, int):
            text = f"{text or ''}[{part}]"
        elif (
            re.fullmatch(r"[A-Za-z_][\w-]*", part)
            and part not in _TYPE_TAGS
            and not part.startswith(_TAG_PREFIXES)
        ):
            text = part if text is None else f"{text}.{part}"
        else:
            break
    return text


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_TAG_PREFIXES = ("function-", "constrained-", "lax-", "strict-", "json-", "tagged-")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = tuple(first.get("loc", ()))
    if loc == ("body",):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    param = _param(loc)
    where = f"{param}: " if param else ""
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", param


def install(app: FastAPI) -> None:
    """Route every error, expected or not, through OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = NOT_FOUND if exc.status_code == 404 else INVALID_REQUEST
        message = (
            f"no such endpoint: {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
        )
        return APIError(exc.status_code, str(message), kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return internal_error(exc).response()
