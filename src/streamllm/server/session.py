"""One server session: its conversation, its cache while it is in memory, and what its state on disk holds."""

from __future__ import annotations

import asyncio
import hashlib
import time

from ..config import StreamConfig
from ..runtime.recalls import Recall
from ..runtime.stream import Stream
from .persist import Conversation
from .store import Lease


class Session:
    """One conversation. ``stream`` and ``convo`` are None while it lives only on disk."""

    def __init__(self, session_id: str, owner: str):
        self.id, self.owner = session_id, owner
        self.lock = asyncio.Lock()
        self.stream: Stream | None = None
        self.convo: Conversation | None = None
        self.text_bytes, self.text_sha256 = 0, hashlib.sha256(b"").hexdigest()
        self.turns = 0
        self.generation = 0  # of the state on disk; 0: never saved
        self.error: str | None = None  # why its saved state cannot be used
        self.dirty = False  # holds a turn that is not on disk yet (its save failed)
        self.last_used = time.monotonic()
        self.updated = time.time()  # of the last turn (or creation): the order of the session list
        self.saved_tokens_seen: int | None = None  # tokens_seen of the state on disk
        self.saved_memory: dict | None = None  # the memory of the state on disk: blocks per layer, file bytes
        self.saved_meta: dict | None = None  # the meta.json of the state on disk, as last read or written
        self.lease: Lease | None = None  # held during a turn (with a store)
        # What the last reply's prompt recalled from memory; this process's, not saved: gone after a restart.
        self.last_recalls: list[Recall] | None = None

    @property
    def loaded(self) -> bool:
        return self.stream is not None

    def live(self) -> tuple[Stream, Conversation]:
        """The stream and conversation of a session in memory (``loaded``); refuses one only on disk."""
        if self.stream is None or self.convo is None:
            raise RuntimeError(f"session {self.id} is not in memory")
        return self.stream, self.convo

    def describe(self, config: StreamConfig) -> dict:
        """The session as the API shows it: counters, the cache's fill and shape, and why it is unusable."""
        seen = self.stream.tokens_seen if self.stream else self.saved_tokens_seen
        length = self.stream.cache_length if self.stream else None
        return {
            "id": self.id,
            "object": "session",
            "turns": self.turns,
            "updated": int(self.updated),
            "in_memory": self.loaded,
            "busy": self.lock.locked(),
            "saved": self.generation > 0,
            "tokens_seen": seen,
            "cache_length": length,
            "evicted": seen - length if seen is not None and length is not None else None,
            "cache": {
                "method": config.method,
                "num_sinks": config.num_sinks,
                "window": config.window,
                "size": config.cache_size,
                "kv_dtype": config.kv_dtype,
            },
            "text_bytes": self.text_bytes,
            "memory": self._memory_stats(config),
            "error": self.error,
        }

    def _memory_stats(self, config: StreamConfig) -> dict | None:
        """Blocks held, where and how many bytes (for a session only on disk, what its saved state holds), and
        what the last reply recalled."""
        if config.memory is None:
            return None
        memory = self.stream.memory if self.stream is not None else None
        held = memory.stats() if memory is not None else self.saved_memory
        recalls = [r.as_dict() for r in self.last_recalls or ()]
        return None if held is None else held | {"last_recalls": recalls}


def saved_memory(meta: dict, config: StreamConfig) -> dict | None:
    """What a saved state's memory holds, as ``Memory.stats`` names it (the part known without loading it)."""
    memory = meta.get("memory")
    if not isinstance(memory, dict) or config.memory is None:
        return None
    try:
        counts = [int(layer["count"]) for layer in memory["layers"].values()]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # loading the session will say what is wrong with it
    blocks = min(counts, default=0)
    return {
        "blocks": blocks,
        "tokens": blocks * config.memory.block_size,
        "layer_blocks_on_disk": sum(counts),
        "disk_bytes": memory.get("file_bytes", 0),
    }
