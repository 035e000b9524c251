"""The HTTP endpoints: OpenAI's ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, plus ``/health``
and ``/v1/sessions`` (this key's sessions) and ``/v1/sessions/{id}``. Replies are OpenAI's JSON objects, or server-sent events ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from fastapi import APIRouter, Header, Request
from starlette.responses import JSONResponse, StreamingResponse

from ..runtime.generate import Event
from .config import ServerConfig
from .errors import NOT_FOUND, APIError, bad_request, internal_error
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest
from .turns import Turn, Turns

SESSION_HEADER = "X-Session-Id"
FED_HEADER = "X-Prompt-Tokens-Fed"
SessionHeader = Header(
    None,
    alias=SESSION_HEADER,
    max_length=128,
    description="Continue this session (as returned by an earlier response) with only the new messages.",
)


class TurnStream(StreamingResponse):
    """A streamed reply that releases its turn however the response ends, even if the body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(turn: Turn, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": turn.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": turn.prompt_tokens + completion_tokens,
        # OpenAI's field for prompt caching: these tokens were already in the session and were not fed again.
        "prompt_tokens_details": {"cached_tokens": turn.cached},
    }


def _headers(turn: Turn) -> dict[str, str]:
    return {SESSION_HEADER: turn.session.id, FED_HEADER: str(len(turn.ids)), "Cache-Control": "no-cache"}


class Api:
    """Routes bound to one server's state."""

    def __init__(self, turns: Turns, config: ServerConfig, started: float, metrics: Metrics | None = None):
        self.turns, self.config, self.created = turns, config, int(started)
        self.metrics = metrics or Metrics()

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/health", self.health, methods=["GET"], summary="Liveness (no API key needed)")
        r.add_api_route("/v1/models", self.models, methods=["GET"], summary="The served model")
        r.add_api_route("/v1/models/{model}", self.model, methods=["GET"], summary="One model")
        r.add_api_route("/v1/chat/completions", self.chat, methods=["POST"], summary="Chat completion")
        r.add_api_route("/v1/completions", self.completions, methods=["POST"], summary="Text completion")
        r.add_api_route("/v1/sessions", self.sessions, methods=["GET"], summary="This key's sessions")
        r.add_api_route(
            "/v1/sessions/{session_id}", self.session, methods=["GET"], summary="A session's state"
        )
        r.add_api_route(
            "/v1/sessions/{session_id}", self.delete_session, methods=["DELETE"], summary="Forget it"
        )
        return r

    # -- simple endpoints ------------------------------------------------------------------------------------------
    async def health(self) -> dict:
        return {"status": "ok", "model": self.config.model_id, "path": self.config.path}

    def _model_card(self) -> dict:
        return {
            "id": self.config.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "streamllm",
            "path": self.config.path,
        }

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model: str) -> dict:
        self._check_model(model, "model")
        return self._model_card()

    async def sessions(self, request: Request) -> dict:
        mine = self.turns.store.owned_by(request.state.owner)
        return {"object": "list", "data": [s.describe(self.config.stream) for s in mine]}

    async def session(self, session_id: str, request: Request) -> dict:
        return self.turns.store.get(session_id, request.state.owner).describe(self.config.stream)

    async def delete_session(self, session_id: str, request: Request) -> dict:
        session = self.turns.store.get(session_id, request.state.owner)
        if session.lock.locked():
            raise APIError(
                409, "the session is busy with a request; try again when it is done", code="session_busy"
            )
        self.turns.store.forget(session)
        return {"id": session_id, "object": "session", "deleted": True}

    def _check_model(self, model: str, param: str = "model") -> None:
        if model != self.config.model_id:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.config.model_id!r}",
                NOT_FOUND,
                param,
                "model_not_found",
            )

    def _max_tokens(self, requested: int | None) -> int:
        limit = self.config.max_tokens_limit
        if requested is not None and requested > limit:
            raise bad_request(
                f"max_tokens must be at most {limit} on this server, got {requested}", "max_tokens"
            )
        return requested or limit

    def _check_length(self, text: str, param: str) -> None:
        if len(text) > self.config.max_message_chars:
            raise bad_request(
                f"{param} has {len(text)} characters; this server accepts at most {self.config.max_message_chars}",
                param,
                "message_too_long",
            )

    # -- completions -----------------------------------------------------------------------------------------------
    async def chat(
        self, body: ChatCompletionRequest, request: Request, session_id: str | None = SessionHeader
    ) -> JSONResponse:
        self._check_model(body.model)
        body.check_supported()
        for i, message in enumerate(body.messages):
            self._check_length(message.text(), f"messages[{i}].content")
        sampling = body.sampling(self._max_tokens(body.requested_max_tokens()))
        deadline = time.monotonic() + self.config.request_timeout_s
        turn = await self.turns.begin_chat(body.messages, request.state.owner, session_id, deadline)
        return await self._respond(turn, body, sampling, deadline, request, chat=True)

    async def completions(
        self, body: CompletionRequest, request: Request, session_id: str | None = SessionHeader
    ) -> JSONResponse:
        self._check_model(body.model)
        body.check_supported()
        sampling = body.sampling(self._max_tokens(body.requested_max_tokens()))
        deadline = time.monotonic() + self.config.request_timeout_s
        owner, prompt = request.state.owner, body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            self.turns.renderer.check_ids(prompt, "prompt")
            turn = await self.turns.begin_ids(list(prompt), owner, deadline)
        else:
            if isinstance(prompt, list) and len(prompt) != 1:
                raise bad_request("exactly one prompt is supported", "prompt")
            # (a list of token ids went the other way)
            text = prompt[0] if isinstance(prompt, list) else prompt
            if not text or not isinstance(text, str):
                raise bad_request("the prompt is empty", "prompt")
            self._check_length(text, "prompt")
            turn = await self.turns.begin_text(text, owner, session_id, deadline)
        return await self._respond(turn, body, sampling, deadline, request, chat=False)

    async def _respond(self, turn: Turn, body, sampling, deadline: float, request: Request, chat: bool):
        events = self.turns.run(turn, sampling, deadline)
        access = getattr(request.state, "access", None)
        if access is not None:  # the access log's record of this request: its line carries these
            access.began(turn.session.id, turn.prompt_tokens, turn.cached)
            events = self.metrics.timed(events, access)
        make = _ChatFormat(self.config.model_id, turn) if chat else _TextFormat(self.config.model_id, turn)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return TurnStream(
                _sse_body(events, make, include_usage, access), lambda: self.turns.abort(turn), _headers(turn)
            )
        try:
            texts, finish, count = await _collect(events, request)
        finally:
            self.turns.abort(turn)  # a no-op once the turn is saved
        return JSONResponse(make.whole("".join(texts), finish, count), headers=_headers(turn))


async def _collect(events: AsyncIterator[Event], request: Request) -> tuple[list[str], str, int]:
    """Run a turn to its end, cancelling it if the client goes away meanwhile."""

    async def gather():
        texts, finish, count = [], "stop", 0
        async for event in events:
            texts.append(event.text)
            count += 1
            finish = event.finish_reason or finish
        return texts, finish, count

    task = asyncio.ensure_future(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "the client closed the connection", code="client_closed_request")
    finally:
        task.cancel()  # a no-op once it is done; otherwise the turn's own cleanup undoes it


async def _sse_body(
    events: AsyncGenerator[Event, None], make, include_usage: bool, access=None
) -> AsyncIterator[str]:
    count = 0
    try:
        first = make.first_chunk()
        if first is not None:
            yield _sse(first)
        async for event in events:
            count += 1
            if event.text:
                yield _sse(make.chunk(event.text, None))
            if event.finish_reason:
                yield _sse(make.chunk(None, event.finish_reason))
        if include_usage:
            yield _sse(make.usage_chunk(count))
        yield _sse("[DONE]")
    except APIError as exc:
        _stream_failed(access, exc.status)
        yield _sse(exc.body())  # headers are gone: the error travels as an event, as OpenAI's do
    except Exception as exc:  # noqa: BLE001
        _stream_failed(access, 500)
        yield _sse(internal_error(exc).body())
    finally:
        await events.aclose()


def _stream_failed(access, status: int) -> None:
    """Note on the access record that a stream ended with an error, whose status its HTTP status (200) hides."""
    if access is not None:
        access.error = status


class _ChatFormat:
    def __init__(self, model_id: str, turn: Turn):
        self.model_id, self.turn = model_id, turn
        self.id, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

    def _head(self, kind: str) -> dict:
        # session_id is not OpenAI's: clients that cannot read the X-Session-Id header find it here.
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}
        return head | {"session_id": self.turn.session.id}

    def first_chunk(self) -> dict | None:
        """The chunk a stream starts with, before any text: the role."""
        return self._chunk({"role": "assistant", "content": ""}, None)

    def chunk(self, text: str | None, finish: str | None) -> dict:
        return self._chunk({"content": text} if text else {}, finish)

    def _chunk(self, delta: dict, finish: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._head("chat.completion.chunk") | {"choices": [choice]}

    def usage_chunk(self, count: int) -> dict:
        return self._head("chat.completion.chunk") | {"choices": [], "usage": _usage(self.turn, count)}

    def whole(self, text: str, finish: str, count: int) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        body = {"choices": [choice], "usage": _usage(self.turn, count)}
        return self._head("chat.completion") | body | self._recalls()

    def _recalls(self) -> dict:
        # Not OpenAI's either, and only with a memory: what this reply's prompt recalled from it.
        if self.turn.recalls is None:
            return {}
        return {"memory_recalls": [r.as_dict() for r in self.turn.recalls]}


class _TextFormat(_ChatFormat):
    def __init__(self, model_id: str, turn: Turn):
        super().__init__(model_id, turn)
        self.id = f"cmpl-{secrets.token_hex(12)}"

    def first_chunk(self) -> dict | None:
        # text completions announce no role
        return None

    def chunk(self, text: str | None, finish: str | None) -> dict:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice]}

    def usage_chunk(self, count: int) -> dict:
        return self._head("text_completion") | {"choices": [], "usage": _usage(self.turn, count)}

    def whole(self, text: str, finish: str, count: int) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = {"choices": [choice], "usage": _usage(self.turn, count)}
        return self._head("text_completion") | body | self._recalls()
