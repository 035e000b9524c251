"""One request's turn: pick the session it continues, feed only what is new, generate, then save.

A turn holds its session's lock from the moment the session is chosen until its state is saved, so two
requests on one session run one after the other. A turn that does not finish (client gone, timeout, failure)
leaves its session exactly as it was before: the previous state is reloaded from disk, or from a copy taken at
the start when nothing is on disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from ..config import StreamConfig
from ..runtime.generate import Event, Sampling, eos_ids
from ..runtime.recalls import Recall
from .config import ServerConfig
from .errors import NOT_FOUND, TIMEOUT, APIError, internal_error
from .persist import Conversation
from .prompts import Renderer
from .scheduler import Job, Scheduler
from .schemas import ChatMessage
from .session import Session
from .sessions import SessionStore

log = logging.getLogger(__name__)


def timeout_error(config: ServerConfig) -> APIError:
    return APIError(
        504,
        f"the request did not finish within the server's request timeout ({config.request_timeout_s:g} s)",
        TIMEOUT,
        code="request_timeout",
    )


@dataclass
class Turn:
    """A chosen session, locked, and the new tokens this turn feeds it."""

    session: Session
    ids: list[int]
    added: str  # the text this turn adds to the conversation before its reply
    cached: int  # tokens of the conversation already in the session (not fed again)
    kind: str  # "chat" or "text"
    snapshot: tuple | None = None  # the session before the turn, when nothing on disk has it
    job: Job | None = None
    state: str = "open"  # -> "committing" -> "closed"
    generated: list[int] = field(default_factory=list)
    failure: APIError | None = None  # why the store did not take the turn (it was undone)
    recalls: list[Recall] | None = None  # what the prompt's end recalled from memory (None: no memory)

    @property
    def prompt_tokens(self) -> int:
        return self.cached + len(self.ids)


class Turns:
    def __init__(self, model, tokenizer, config: ServerConfig, store: SessionStore, scheduler: Scheduler):
        self.model, self.config, self.store, self.scheduler = model, config, store, scheduler
        self.tokenizer = tokenizer  # used by the model worker only
        self.renderer = Renderer(tokenizer, config.bos)
        self.eos_ids = eos_ids(model, tokenizer)

    # -- choosing the session ----------------------------------------------------------------------------------
    async def begin_chat(
        self, messages: Sequence[ChatMessage], owner: str, session_id: str | None, deadline: float
    ) -> Turn:
        prompt = await asyncio.to_thread(self.renderer.chat_prompt, messages)
        if session_id is not None:
            session = await self._locked(self.store.get(session_id, owner), deadline)
            added = await self._continued(session, prompt)
            if added:  # the whole history, resent
                return await self._plan(session, added, "chat")
            if not any(m.role == "assistant" for m in messages):  # only the new turn
                try:
                    suffix = await asyncio.to_thread(
                        self.renderer.chat_continuation, messages, session.live()[1].close
                    )
                except BaseException:
                    self._release(session)
                    raise
                return await self._plan(session, suffix, "chat")
            log.info("history does not match session %s: starting a new session", session.id)
            self._release(session)
        history = any(m.role == "assistant" for m in messages)  # a conversation had elsewhere, resent
        return await self._match_or_create(owner, prompt, deadline, "chat", history)

    async def begin_text(self, prompt: str, owner: str, session_id: str | None, deadline: float) -> Turn:
        if session_id is not None:
            session = await self._locked(self.store.get(session_id, owner), deadline)
            added = await self._continued(session, prompt)
            return await self._plan(session, added or prompt, "text")  # the rest of it, or new text appended
        return await self._match_or_create(owner, prompt, deadline, "text")

    async def begin_ids(self, ids: list[int], owner: str, deadline: float) -> Turn:
        """A prompt given as token ids: fed exactly as given, into a new session."""
        session = await self._locked(self.store.create(owner), deadline)
        text = await asyncio.to_thread(self.renderer.decode, ids)
        return self._turn(session, ids, text, "text")

    async def _match_or_create(
        self, owner: str, text: str, deadline: float, kind: str, history: bool = False
    ) -> Turn:
        """The session whose conversation ``text`` goes on from, or a new one. ``history``: ``text`` holds an
        earlier conversation (replies included), which ``--history window`` may enter by its window."""
        for candidate in self.store.candidates(owner, text):
            try:
                session = await self._locked(candidate, deadline)
            except APIError as exc:
                if exc.status in (409, 504):  # held by another process: a new session here would fork it
                    raise
                continue  # gone, or its saved state is unusable: never mind, another session will do
            added = await self._continued(session, text)
            if added:
                return await self._plan(session, added, kind)
            self._release(session)  # it moved on while we waited for it
        session = await self._locked(self.store.create(owner), deadline)
        return await self._plan(session, text, kind, history)

    async def _continued(self, session: Session, text: str) -> str | None:
        """What ``text`` adds to the (locked) session's conversation, if it goes on from it (``continued_by``,
        a hash of up to the whole history, off the event loop); the session is let go if this is cancelled."""
        try:
            return await asyncio.to_thread(session.live()[1].continued_by, text)
        except BaseException:
            self._release(session)
            raise

    async def _locked(self, session: Session, deadline: float) -> Session:
        """Lock the session and load its cache; raises 504 past the deadline, 500 for unusable saved state."""
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await session.lock.acquire()
        except TimeoutError:
            raise timeout_error(self.config) from None
        if self.store.sessions.get(session.id) is not session:  # forgotten or deleted while we waited
            self._release(session)
            raise APIError(
                404, f"unknown session {session.id!r}", NOT_FOUND, "X-Session-Id", "session_not_found"
            )
        try:
            await self.store.load(session, deadline)
        except TimeoutError:
            self._release(session)
            raise timeout_error(self.config) from None
        except BaseException:
            self._release(session)
            raise
        return session

    async def _plan(self, session: Session, added: str, kind: str, history: bool = False) -> Turn:
        """The turn that feeds ``added``, the text this request adds to the session's conversation; for a new
        session started from an earlier conversation (``history``), only its window under ``--history window``."""
        try:
            _, convo = session.live()
            ids = await asyncio.to_thread(self.renderer.encode, added, not convo.token_count)
        except BaseException:
            self._release(session)
            raise
        if history and not convo.token_count and self.config.history == "window":
            fed = bounded(ids, self.config.stream)
            if len(fed) < len(ids):
                log.info(
                    "session %s starts from a history of %d tokens; %d of them fed (--history window)",
                    session.id,
                    len(ids),
                    len(fed),
                )
            ids = fed
        return self._turn(session, ids, added, kind)

    def _turn(self, session: Session, ids: list[int], added: str, kind: str) -> Turn:
        stream, convo = session.live()
        snapshot = None
        if convo.turns and (self.store.storage is None or session.dirty):
            snapshot = (stream.state(), convo.copy())
        return Turn(session, ids, added, convo.token_count, kind, snapshot)

    def _release(self, session: Session) -> None:
        if session.lock.locked():
            self.store.end_turn(session)
            session.lock.release()
        self.store.notify()

    # -- running it ----------------------------------------------------------------------------------------------
    async def run(self, turn: Turn, sampling: Sampling, deadline: float) -> AsyncGenerator[Event, None]:
        """Yield the turn's events; once the last one is out, save the session. Any other exit undoes the turn."""
        loop = asyncio.get_running_loop()
        chunk = self.config.stream.chunk_size
        batched = self.config.batch_decode > 1
        stream, _ = turn.session.live()
        job = Job(self.model, self.tokenizer, stream, turn.ids, sampling, loop, chunk, batched)
        reply: list[str] = []
        last: Event | None = None
        try:
            self.scheduler.submit(job)
            turn.job = job  # from here on the stream may change: an abort must wait for the worker, then undo
            while True:
                try:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                        kind, payload = await turn.job.queue.get()
                except TimeoutError:
                    raise timeout_error(self.config) from None
                if kind == "error":
                    raise internal_error(payload)
                if kind == "done":
                    break
                turn.generated.append(payload.token)
                if payload.recalls is not None:
                    turn.recalls = payload.recalls
                reply.append(payload.text)
                last = payload
                yield payload
            turn.state = "committing"
            commit = asyncio.create_task(self._commit(turn, "".join(reply), last))
            # The save goes on even if this request is cancelled now; the task releases the session.
            await asyncio.shield(commit)
            if turn.failure is not None:
                raise turn.failure
        finally:
            self.abort(turn)

    async def _commit(self, turn: Turn, reply: str, last: Event | None) -> None:
        session = turn.session
        try:
            _, convo = session.live()
            eos = ""
            if last is not None and last.finish_reason == "stop" and last.token in self.eos_ids:
                eos = await asyncio.to_thread(self.renderer.decode, [last.token])
            convo.extend((turn.added + reply + eos).encode("utf-8"), [*turn.ids, *turn.generated])
            convo.close = self.renderer.reply_close(eos) if turn.kind == "chat" else ""
            convo.turns += 1
            self.store.reindex(session)
            try:
                await self.store.save(session)
            except APIError as exc:  # the store is down, or another process moved the session on
                log.warning("session %s: the turn was not committed, so it is undone: %s", session.id, exc)
                self.store.revert(session)
                turn.failure = exc
            except Exception:
                log.exception("session %s: could not save its state; it stays in memory", session.id)
            if turn.failure is None:
                session.last_recalls = turn.recalls
        finally:
            turn.state = "closed"
            self._release(session)

    def abort(self, turn: Turn) -> None:
        """Undo a turn that did not finish and release its session. Synchronous and idempotent, so it is safe
        in any cleanup path, cancelled or not. The undo waits until the model worker has let go of the stream."""
        if turn.state != "open":
            return
        turn.state = "closed"
        job = turn.job
        if job is None:  # nothing was fed
            self._release(turn.session)
        elif job.stopped.done():
            self._undo(turn)
        else:
            job.cancel()
            job.stopped.add_done_callback(lambda _: self._undo(turn))

    def _undo(self, turn: Turn) -> None:
        session = turn.session
        try:
            stream, convo = session.live()
            if turn.snapshot is not None:
                state, before = turn.snapshot
                stream.load(state)
                session.convo = before
            elif convo.turns and self.store.storage is not None:
                self.store.unload(session)  # the state before this turn is on disk; it reloads on demand
            else:  # a new session: back to empty
                stream.reset()
                session.convo = Conversation()
            log.info("session %s: unfinished turn undone", session.id)
        except Exception:
            log.exception("session %s: could not undo an unfinished turn; forgetting it", session.id)
            self.store.forget(session)
        finally:
            self._release(session)


def bounded(ids: list[int], config: StreamConfig) -> list[int]:
    """The tokens of a history that a new session feeds under ``--history window``: all of them when they fit in
    the cache, else the last ``num_sinks + window`` for the window method, and for the others the first
    ``num_sinks`` (the attention sinks, where the text starts) and the last ``window``: what the cache would hold
    after streaming all of it. A dense cache, which has no bound, takes all of them."""
    size = config.cache_size
    if config.method == "dense" or len(ids) <= size:
        return ids
    S = 0 if config.method == "window" else config.num_sinks
    return ids[:S] + ids[len(ids) - (size - S) :]
