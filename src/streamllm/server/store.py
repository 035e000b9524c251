"""Where saved sessions live: one interface, two backends (``stores.open_store`` opens the one a config names).

- ``statedir.StateDir`` (``--state-dir DIR``): a folder per session on a local or shared file system. Embedded,
  nothing to start; several processes on one machine may share it.
- ``redis_store.RedisStore`` (``--store redis://HOST:PORT/DB``): Redis or Valkey, for replicas on several machines.

Both hold the same things for a session: its ``meta.json`` (the commit point: which state, how much of the
journal, the counters and digests), its last whole state, the journal of turns appended after it, the memory's
blocks file, and its lease. ``sessions.SessionStore`` drives them through the methods below and never touches
the storage itself.

**Leases.** A process runs a turn of a session only while it holds the session's lease, from the moment the
turn locks the session until it has committed (or undone) the turn. Between turns nobody holds it, so any
process may serve the next turn: it takes the lease, compares the stored generation with the one it holds in
memory, and reloads the session when another process has moved it on. A commit names the generation it follows
and is refused (``LeaseLost``) when that is no longer the stored one, so two processes can never both commit a
turn after the same state: a turn is never forked or lost, and a refused one is undone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from pathlib import Path

from .errors import INVALID_REQUEST, SERVER_ERROR, APIError


class StoreUnavailable(APIError):
    """The store cannot be reached or refuses this server (503; the turn is not applied)."""

    def __init__(self, detail: str):
        super().__init__(
            503,
            f"the session store is unavailable ({detail}); nothing of this request was applied, retry later",
            SERVER_ERROR,
            code="store_unavailable",
        )


class LeaseLost(APIError):
    """A commit was refused: the session's stored state is not the one this turn followed (another process
    committed or deleted it meanwhile, or this process's lease ran out). 409; the turn is undone."""

    def __init__(self, detail: str):
        super().__init__(
            409,
            f"another server process moved this session on during the turn ({detail}); the turn was undone, "
            "send it again",
            INVALID_REQUEST,
            "X-Session-Id",
            "session_moved_on",
        )


class Lease(ABC):
    """One process's hold on one session, given back by ``release`` (idempotent)."""

    @abstractmethod
    def release(self) -> None: ...


class Store(ABC):
    """The saved sessions of one model and cache configuration."""

    #: how to name the store in logs and messages (never a password)
    where: str

    @abstractmethod
    def lease(self, session_id: str) -> Lease | None:
        """Take the session's lease, or None when another process holds it. Never waits."""

    @abstractmethod
    def ids(self) -> list[str]:
        """The ids of the sessions saved so far (a first turn that never committed leaves none)."""

    @abstractmethod
    def read_meta(self, session_id: str) -> dict:
        """The session's committed meta, checked against this model and configuration; raises ``StateError``."""

    @abstractmethod
    def generation(self, session_id: str) -> int:
        """The generation of the session's committed state, 0 when there is none (deleted, never saved)."""

    @abstractmethod
    def saved_at(self, session_id: str) -> float:
        """When the session's last turn was committed (unix time)."""

    @abstractmethod
    def memory_file(self, session_id: str) -> Path:
        """The local file a stream of this session keeps its memory's blocks in."""

    @abstractmethod
    def read(self, session_id: str) -> tuple[dict, bytes, bytes]:
        """(meta, state bytes, committed journal bytes), the state checked against its digest, the memory's
        blocks made available at ``memory_file``; raises ``StateError``."""

    @abstractmethod
    def read_log(self, session_id: str, meta: dict) -> tuple[bytearray, array]:
        """The whole text and token log of the state ``meta`` describes; raises ``StateError``."""

    @abstractmethod
    def append(self, session_id: str, saved: dict, meta: dict, record: bytes) -> dict:
        """Commit a turn as one journal record after the state ``saved`` (the last committed meta), ``meta``
        advanced to it. -> the committed meta. Raises ``LeaseLost`` when ``saved`` is no longer the stored
        state."""

    @abstractmethod
    def write(self, session_id: str, saved: dict | None, meta: dict, blob: bytes) -> dict:
        """Commit a whole new state after ``saved`` (None for a session's first save). -> the committed meta.
        Raises ``LeaseLost`` when ``saved`` is no longer the stored state."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Remove everything the session left (its holder calls this, under the lease)."""

    def discard(self, session_id: str) -> None:  # noqa: B027 (a hook: nothing to do unless a backend needs it)
        """The session's stream left this process's memory: local copies of stored files may go."""

    def sweep(self) -> None:  # noqa: B027 (a hook: nothing to do unless a backend needs it)
        """Remove what a crashed process may have left half-written (at start-up)."""

    def close(self) -> None:  # noqa: B027 (a hook: nothing to do unless a backend needs it)
        """The server stops."""
