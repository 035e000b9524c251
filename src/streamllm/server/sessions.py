"""Sessions: which exist, whose they are, which hold their cache in memory, and which one a request continues.

Every known session (in memory or only on disk) is in the index by owner and by the digest of its text
(``index.py``), so a resent history finds the session it extends without reading any file. At most ``max_sessions`` sessions hold a cache in memory; the least recently used idle ones give theirs
up (their state is on disk after every turn) when another needs room.

All methods run on the event loop thread; only loading and saving go to worker threads, each touching only its
own session, which the caller holds locked.

With a store (``--state-dir`` or ``--store``, ``store.py``), several processes may serve the same sessions. A turn
runs under the session's lease, taken when the turn locks the session (waiting up to ``lease_wait_s`` while
another process runs a turn of it, then 409) and given back when the turn is over. A cache kept in memory between
turns is reused only if the stored generation is still the one it holds; otherwise another process has moved the
session on, and it is reloaded. Sessions that other processes create are found in the store when a request names
them, or when a resent history matches none that is known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections import OrderedDict

from ..runtime.stream import Stream
from .config import ServerConfig
from .errors import INVALID_REQUEST, NOT_FOUND, SERVER_ERROR, APIError
from .index import TextIndex
from .journal import encode_record
from .metrics import Metrics
from .persist import (
    SESSION_ID,
    Conversation,
    StateError,
    advance_meta,
    decode_state,
    encode_state,
    new_session_id,
)
from .session import Session, saved_memory
from .store import Store
from .stores import open_store

log = logging.getLogger(__name__)


class SessionStore:
    def __init__(self, model, config: ServerConfig, metrics: Metrics | None = None):
        self.model, self.config = model, config
        self.metrics = metrics or Metrics()
        self.storage = open_store(config)
        self.sessions: dict[str, Session] = {}
        self._index = TextIndex()
        self._loaded: OrderedDict[str, None] = OrderedDict()  # loaded sessions, least recently used first
        self._waiters: list[asyncio.Future] = []

    # -- the index --------------------------------------------------------------------------------------------
    def scan_storage(self) -> None:
        """Index the sessions saved in the store (metadata only; caches load on demand)."""
        if self.storage is None:
            return
        self.storage.sweep()
        for session_id in self.storage.ids():
            self._index_saved(session_id)
        log.info("%d saved sessions indexed from %s", len(self.sessions), self.storage.where)

    def _index_saved(self, session_id: str) -> Session:
        """Index one session saved on disk from its ``meta.json`` (one that cannot be read is known, with its
        error, so that its owner gets a clear one rather than a 404)."""
        session = Session(session_id, owner="")
        try:
            meta = self._store().read_meta(session_id)
        except StateError as exc:
            log.warning("session %s cannot be restored: %s", session_id, exc)
            session.error = str(exc)
            self.sessions[session_id] = session
            return session
        self._apply_meta(session, meta)
        self._add(session)
        return session

    def _apply_meta(self, session: Session, meta: dict, updated: float | None = None) -> None:
        session.owner, session.turns, session.generation = meta["owner"], meta["turns"], meta["generation"]
        session.text_bytes, session.text_sha256 = meta["text_bytes"], meta["text_sha256"]
        session.saved_tokens_seen = meta["tokens_seen"]
        session.saved_memory = saved_memory(meta, self.config.stream)
        session.saved_meta = meta
        session.updated = self._store().saved_at(session.id) if updated is None else updated

    def _store(self) -> Store:
        """The session store, where the server has one (calls that need it are made only then)."""
        if self.storage is None:
            raise RuntimeError("this server keeps no sessions on disk")
        return self.storage

    def _discover(self) -> None:
        """Index the sessions other processes saved since this one last looked."""
        if self.storage is not None:
            for session_id in self.storage.ids():
                if session_id not in self.sessions:
                    self._index_saved(session_id)

    def _add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self._index.add(session.id, session.owner, session.text_bytes, session.text_sha256)

    def _remove_from_index(self, session: Session) -> None:
        self._index.remove(session.id, session.owner, session.text_bytes, session.text_sha256)

    def reindex(self, session: Session) -> None:
        """Call after the session's conversation changed."""
        self._remove_from_index(session)
        _, convo = session.live()
        session.text_bytes, session.text_sha256 = convo.text_bytes, convo.sha256
        session.turns = convo.turns
        session.updated = time.time()
        self._index.add(session.id, session.owner, session.text_bytes, session.text_sha256)

    def candidates(self, owner: str, text: str) -> list[Session]:
        """Sessions of ``owner`` whose text is a prefix of ``text``, longest first (by digest; verify the text).

        A busy session stays a candidate: a client that retries a request whose first try is still running (or
        being cancelled) should continue the same session once it is free, not fork a new one."""
        found = self._candidates(owner, text)
        if not found and self.storage is not None:  # perhaps a session another process started
            self._discover()
            found = self._candidates(owner, text)
        return found

    def _candidates(self, owner: str, text: str) -> list[Session]:
        found: list[Session] = []
        for length, session_id in self._index.prefixes(owner, text):
            session = self.sessions.get(session_id)
            if session is None or session.error is not None:
                continue
            if length == 0 and session.lock.locked():
                continue  # a new session in its first turn: any idle or new session does as well
            found.append(session)
        return sorted(found, key=lambda s: (-s.text_bytes, s.lock.locked(), not s.loaded))

    def owned_by(self, owner: str) -> list[Session]:
        """The sessions of ``owner``, most recently used first."""
        self._discover()
        mine = [s for s in self.sessions.values() if s.owner == owner]
        return sorted(mine, key=lambda s: -s.updated)

    def create(self, owner: str) -> Session:
        session = Session(new_session_id(), owner)
        session.convo = Conversation()
        self._add(session)
        return session

    def get(self, session_id: str, owner: str) -> Session:
        """The session with this id if ``owner`` may use it; else 404 (whether it exists or not)."""
        session = self.sessions.get(session_id) if SESSION_ID.fullmatch(session_id) else None
        if session is None and SESSION_ID.fullmatch(session_id) and self.storage is not None:
            if session_id in self.storage.ids():  # saved by another process sharing the state folder
                session = self._index_saved(session_id)
        if session is None or (session.owner != owner and session.error is None):
            raise APIError(
                404, f"unknown session {session_id!r}", NOT_FOUND, "X-Session-Id", "session_not_found"
            )
        if session.error is not None:
            raise self.broken(session)
        return session

    @staticmethod
    def broken(session: Session) -> APIError:
        return APIError(
            500,
            f"session {session.id} cannot be restored: {session.error}. Other sessions are not affected; start a "
            "new session (send the request without X-Session-Id).",
            SERVER_ERROR,
            "X-Session-Id",
            "session_state_unusable",
            headers={"x-should-retry": "false"},
        )

    @staticmethod
    def elsewhere(session: Session) -> APIError:
        return APIError(
            409,
            f"session {session.id} is in a turn on another server process sharing this store; retry once that "
            "turn is over",
            INVALID_REQUEST,
            "X-Session-Id",
            "session_elsewhere",
        )

    def forget(self, session: Session) -> None:
        """Drop the session everywhere, its files included; 409 while another process holds it."""
        if self.storage is not None and session.generation and session.lease is None:
            session.lease = self.storage.lease(session.id)
            if session.lease is None:
                raise self.elsewhere(session)
        self._remove_from_index(session)
        self.sessions.pop(session.id, None)
        self._loaded.pop(session.id, None)
        session.stream = session.convo = None
        if self.storage is not None and session.generation:
            self.storage.delete(session.id)
        self.end_turn(session)

    def close(self) -> None:
        """The server stops: give back the leases of turns still running, so that another process (or this one,
        serving again) can go on with those sessions."""
        for session in self.sessions.values():
            self.end_turn(session)
        if self.storage is not None:
            self.storage.close()

    @staticmethod
    def end_turn(session: Session) -> None:
        """The turn of the (locked) session is over: give back its lease."""
        if session.lease is not None:
            session.lease.release()
            session.lease = None

    async def _take_lease(self, session: Session, deadline: float) -> None:
        """Take the session's lease, waiting while another process runs a turn of it: up to ``lease_wait_s`` (and
        the request's deadline), then 409."""
        start = time.monotonic()
        give_up = min(deadline, start + self.config.lease_wait_s)
        try:
            while (lease := await asyncio.to_thread(self._store().lease, session.id)) is None:
                if time.monotonic() >= give_up:
                    raise self.elsewhere(session)
                await asyncio.sleep(0.05)
        finally:
            self.metrics.lease_waited(time.monotonic() - start)
        session.lease = lease

    async def _check_current(self, session: Session) -> None:
        """The (leased) session goes on from what the store holds: a cache in memory is reused only if the store
        still holds the state it came from (else another process moved the session on, and it is reloaded), and
        a session deleted by another process is gone (404)."""
        storage = self._store()
        stored = await asyncio.to_thread(storage.generation, session.id)
        if stored == session.generation:
            return
        if session.loaded:
            log.info(
                "session %s was moved on elsewhere (generation %d, here %d): reloading it",
                session.id,
                stored,
                session.generation,
            )
            self._loaded.pop(session.id, None)
            session.stream = session.convo = None
            session.dirty = False
            storage.discard(session.id)
        if stored == 0:
            self._remove_from_index(session)
            self.sessions.pop(session.id, None)
            raise APIError(
                404, f"unknown session {session.id!r}", NOT_FOUND, "X-Session-Id", "session_not_found"
            )

    # -- memory --------------------------------------------------------------------------------------------------
    async def load(self, session: Session, deadline: float) -> None:
        """Take the (locked) session's lease for a turn and make sure it holds its cache in memory, as stored,
        making room if needed."""
        if self.storage is not None and session.lease is None:
            await self._take_lease(session, deadline)
            if session.generation:
                try:
                    await self._check_current(session)
                except BaseException:
                    self.end_turn(session)
                    raise
        if session.loaded:
            self._loaded.move_to_end(session.id)
            session.last_used = time.monotonic()
            return
        try:
            await self._make_room(session, deadline)
        except BaseException:
            self.end_turn(session)
            raise
        self._loaded[session.id] = None  # the room is taken now, before anything else can take it
        memory_file = self.storage.memory_file(session.id) if self.storage is not None else None
        stream = Stream(self.model, self.config.stream, memory_file=memory_file)
        if session.convo is None:  # saved on disk: its latest turn, whichever process saved it
            try:
                start = time.perf_counter()
                meta, blob, records = await asyncio.to_thread(self._store().read, session.id)
                if meta["owner"] != session.owner:
                    raise StateError("meta.json names another owner")
                session.convo = await asyncio.to_thread(decode_state, meta, blob, stream, records)
                self.metrics.store_op("load", time.perf_counter() - start)
            except StateError as exc:
                log.warning("session %s cannot be restored: %s", session.id, exc)
                session.error = str(exc)
                self._remove_from_index(session)
                self._loaded.pop(session.id, None)
                self.end_turn(session)
                raise self.broken(session) from None
            except BaseException:
                self._loaded.pop(session.id, None)
                self.end_turn(session)
                raise
            self._remove_from_index(session)
            self._apply_meta(session, meta)
            self._add(session)
        session.stream = stream
        session.last_used = time.monotonic()

    def unload(self, session: Session) -> None:
        """Drop the cache from memory. A session saved on disk stays known and reloads on demand; one that was
        never saved (no ``--state-dir``) has nowhere else to live and is forgotten."""
        self._loaded.pop(session.id, None)
        if self.storage is not None and session.generation > 0 and not session.dirty:
            session.stream = session.convo = None
            self.storage.discard(session.id)
            return
        if session.turns:
            log.info("session %s forgotten to make room (nothing keeps it on disk)", session.id)
        self.forget(session)

    async def _make_room(self, session: Session, deadline: float) -> None:
        while len(self._loaded) >= self.config.max_sessions:
            victim = next((self.sessions[i] for i in self._loaded if self._evictable(self.sessions[i])), None)
            if victim is not None:
                self.unload(victim)
                continue
            remaining = deadline - time.monotonic()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    await waiter
            except TimeoutError:
                raise TimeoutError("every in-memory session is busy") from None

    def _evictable(self, session: Session) -> bool:
        # Busy sessions are in use; dirty ones (their last save failed) would lose a turn.
        return not session.lock.locked() and not session.dirty

    def notify(self) -> None:
        """A session became idle: waiters for memory may try again. Synchronous, so it is safe in cleanups."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def revert(self, session: Session) -> None:
        """The store did not take the (locked) session's turn: forget the turn, so that the session goes on from
        its stored state (reloaded on demand), or is gone if it never had one."""
        self._loaded.pop(session.id, None)
        session.stream = session.convo = None
        session.dirty = False
        self._store().discard(session.id)
        self._remove_from_index(session)
        if session.saved_meta is None:
            self.sessions.pop(session.id, None)
            return
        self._apply_meta(session, session.saved_meta, session.updated)
        self._add(session)

    # -- saving --------------------------------------------------------------------------------------------------
    async def save(self, session: Session) -> None:
        """Commit the (locked) session's turn: a journal record of what changed since the last save, or a whole
        state where one is due (``journal.py``); a no-op without ``--state-dir``."""
        stream, convo = session.live()
        if self.storage is None:
            convo.saved()  # nothing keeps the text: its digest is all a session needs
            return
        session.dirty = True
        start = time.perf_counter()
        saved = session.saved_meta
        record = None
        if saved is not None and session.generation == saved.get("generation"):
            record = await asyncio.to_thread(encode_record, saved, convo, stream)
        if (
            saved is not None
            and record is not None
            and saved["journal"]["bytes"] + len(record[0]) <= saved.get("state_bytes", 0)
        ):
            meta = advance_meta(saved, convo, stream, record[1])
            meta = await asyncio.to_thread(self.storage.append, session.id, saved, meta, record[0])
            kind, written = "a journal record", len(record[0])
        else:  # a whole state: the first save, after a rebase or a restore, or once the journal is as big
            text, tokens = bytearray(), array("i")
            if saved is not None:  # the conversation as saved, then what was said since
                text, tokens = await asyncio.to_thread(self.storage.read_log, session.id, saved)
            text += convo.unsaved_text
            tokens.extend(convo.unsaved_tokens)
            meta, blob = await asyncio.to_thread(
                encode_state,
                session.id,
                session.owner,
                self.config.model_id,
                self.config.stream,
                convo,
                stream,
                (bytes(text), tokens),
            )
            meta = await asyncio.to_thread(self.storage.write, session.id, saved, meta, blob)
            kind, written = "a whole state", len(blob)
        seconds = time.perf_counter() - start
        self.metrics.store_op("save", seconds)
        log.info("session %s saved: %s, %d bytes in %.1f ms", session.id, kind, written, 1000 * seconds)
        stream.mark_saved()
        convo.saved()
        session.generation += 1
        session.saved_meta = meta
        session.saved_memory = saved_memory(meta, self.config.stream)
        session.dirty = False
