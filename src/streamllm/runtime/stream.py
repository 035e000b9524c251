"""``Stream``: one endless stream of tokens through a model, under one of the paper's methods.

``feed`` takes any number of new tokens and processes them in chunks of ``chunk_size``; every token inside a
chunk sees exactly what it would see if fed alone (the cache's plan says what), so a long prompt never silently
gets dense attention. Single tokens go through the model's fast decode step where it has one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..backends.arch import lookup
from ..backends.batched import batchable, decode_step
from ..backends.decode import decoder_for
from ..backends.hf import cache_for, forward, prepare
from ..config import StreamConfig
from ..core.cache import Evicted, KVCache
from ..core.memory import Memory
from ..core.policy import Policy
from .recompute import Recompute
from .state import State, flatten, unflatten, with_memory_of

# the weights a decode path reads (``backends.decode.decoder_for``)
WEIGHTS = {"fast": "model", "int4": "int4"}


def decode_path(model, config: StreamConfig) -> str:
    """The path single tokens of a stream of ``model`` under ``config`` really take: ``config.decode``, or
    transformers' forward where the model has no fast step or the method rebuilds every context."""
    if config.decode not in WEIGHTS or config.method == "recompute" or not lookup(model.config).fast_decode:
        return "transformers"
    return config.decode


class Stream:
    """A model, a configuration and the state of one stream: a ``KVCache`` (or ``Recompute``'s recent tokens).

    ``policy`` replaces the one ``config.method`` names (any ``core.policy.Policy``); ``on_evict`` receives every
    batch of tokens that leaves the cache (``core.cache.Evicted``); ``memory_file``: the file the memory's blocks
    are saved to (``Memory.persist``), so that the stream can be restored with its memory."""

    def __init__(
        self,
        model,
        config: StreamConfig | None = None,
        policy: Policy | None = None,
        on_evict: Callable[[Evicted], None] | None = None,
        memory_file: Path | None = None,
    ):
        self.model = prepare(model)
        self.memory_file = memory_file
        self.config = config or StreamConfig()
        self.policy, self.on_evict = policy, on_evict
        path = decode_path(self.model, self.config)
        self.decoder = decoder_for(self.model, WEIGHTS[path]) if path in WEIGHTS else None
        self.reset()

    def reset(self) -> None:
        """Forget everything: a fresh, empty cache."""
        self.cache: KVCache | Recompute
        if self.config.method == "recompute":
            self.cache = Recompute(self.model, self.config.cache_size)
        else:
            self.cache = cache_for(
                self.model, self.config, self.on_evict, policy=self.policy, memory_file=self.memory_file
            )

    @property
    def decode_path(self) -> str:
        """The path single tokens really take: ``config.decode``, or transformers' forward where the model has no
        fast step (or the method rebuilds every context)."""
        return self.config.decode if self.decoder is not None else "transformers"

    @property
    def tokens_seen(self) -> int:
        return self.cache.seen

    @property
    def cache_length(self) -> int:
        """Tokens held in the cache now (recompute: in its context)."""
        return self.cache.cache_length()

    @property
    def batchable(self) -> bool:
        """Whether this stream's next token can share a pass with other streams' (``feed_together``): a bounded
        cache whose layers share one policy, something in it already, and a memory (if any) that does not select at
        this token."""
        return not isinstance(self.cache, Recompute) and batchable(self.cache)

    def cache_bytes(self) -> int:
        return self.cache.memory_bytes()

    @property
    def memory(self) -> Memory | None:
        """The stream's ``core.memory.Memory``, or None."""
        return getattr(self.cache, "memory", None)

    # -- saving and restoring (``state.py``) --------------------------------------------------------------------
    def state(self) -> State:
        """(tensors, meta): everything needed to continue this stream later, named as ``state.py`` says; the
        tensors are copies on the CPU. The memory's blocks are not in it (``persist``)."""
        if isinstance(self.cache, Recompute):  # it keeps only its recent tokens (and its contexts' BOS)
            tensors = {f"recompute.{name}": t for name, t in self.cache.state_dict().items()}
            return tensors, {"layers": [], "memory": None, "tokens_seen": self.tokens_seen}
        tensors, meta = flatten(self.cache.state_dict())
        return tensors, meta | {"tokens_seen": self.tokens_seen}

    def changes(self) -> State | None:
        """What changed since ``mark_saved``, in the form of ``state``: per layer only the slots written since
        (``layers.<i>.slots``). None where the whole state must be saved instead: nothing was saved yet, a state
        was loaded, a rebase turned every window key, or the method keeps no slots."""
        changed = self.cache.changes()
        return None if changed is None else flatten(changed)

    def mark_saved(self) -> None:
        """The stream as it is now is saved: ``changes`` counts from here."""
        self.cache.mark_saved()

    def persist(self) -> None:
        """Append the blocks the memory kept since the last call to its file and sync it (a no-op without a
        memory), so that a ``state`` or ``changes`` taken after it can be restored from that file. Raises
        ``state.MemoryFileError``; then the file counts as it was before."""
        if self.memory is not None:
            self.memory.persist()

    def load(self, state: State, changes: Sequence[State] = ()) -> None:
        """Go on from a ``state`` of this model and configuration, and the ``changes`` saved after it, in order.
        A fresh stream restores its memory from its memory file; the stream the state was taken from rolls its
        memory back to it (the blocks kept since are dropped). Raises ``ValueError`` (or ``KeyError``,
        ``TypeError``, ``RuntimeError``) where the state does not fit, ``state.MemoryFileError`` where the memory
        file does not."""
        tensors, meta = state
        if changes:
            tensors, meta = with_memory_of(state, changes[-1])
        self._reset_keeping_memory()
        if isinstance(self.cache, Recompute):
            if changes:
                raise ValueError("a recompute stream keeps no changes")
            saved = {
                name: tensors[f"recompute.{name}"]
                for name in ("recent", "prefix")
                if f"recompute.{name}" in tensors
            }
            self.cache.load_state_dict(saved, int(meta["tokens_seen"]))
            return
        if (meta.get("memory") is None) != (self.memory is None):
            raise ValueError("the state and the stream disagree on whether there is a memory")
        device = next(self.model.parameters()).device
        self.cache.load_state_dict(unflatten((tensors, meta), device))
        if self.tokens_seen != int(meta["tokens_seen"]):
            raise ValueError(f"the cache has seen {self.tokens_seen} tokens, the state {meta['tokens_seen']}")
        for later in changes:  # the memory is already as the last of them left it
            self.cache.load_changes(unflatten(later, device, memory=False))

    def snapshot(self) -> dict:
        """A copy of this stream's state, to come back to with ``rewind`` (ask a question, then take it back)."""
        if isinstance(self.cache, Recompute):
            raise ValueError("a recompute stream keeps no state to snapshot")
        return _copy(self.cache.state_dict())

    def rewind(self, state: dict) -> None:
        """Go back to a ``snapshot`` of this stream: the cache as it was, and the memory rolled back in place (the
        blocks kept since are dropped, the older ones stay where they are)."""
        if isinstance(self.cache, Recompute):
            raise ValueError("a recompute stream keeps no state to rewind to")
        self._reset_keeping_memory()
        self.cache.load_state_dict(_copy(state))

    def _reset_keeping_memory(self) -> None:
        """A fresh cache that keeps this stream's memory (whose blocks a state loaded next rolls back)."""
        memory = self.memory
        self.reset()
        if memory is not None and isinstance(self.cache, KVCache) and self.cache.memory is not None:
            self.cache.memory.close()
            self.cache.memory = memory

    @torch.no_grad()
    def feed(
        self, ids: Sequence[int], recall: bool = False, query: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Process new tokens; returns the logits (V,) that predict the token after the last one. With ``recall``
        and a memory, the last token selects what is recalled (say, the end of a question); ``query``: the
        tokens that say what to recall, for content selection (default: the tokens fed, up to the last 512)."""
        if len(ids) == 0:
            raise ValueError("nothing to feed")
        if recall and self.memory is not None:
            self.memory.recall_at(self.tokens_seen + len(ids) - 1, ids if query is None else query)
        # every chunk is fed; only the last one's logits (1, V) are kept
        last = deque(self.chunks(ids, keep_all=False), maxlen=1)[0]
        return last[-1]

    @torch.no_grad()
    def chunks(self, ids: Sequence[int], keep_all: bool = True) -> Iterator[torch.Tensor]:
        """Process new tokens chunk by chunk, yielding each chunk's logits (T, V) (or only the last row)."""
        ids = [int(i) for i in ids]
        if self.memory is not None:
            self.memory.note(self.tokens_seen, ids)
        step = self.config.chunk_size
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]  # forward splits it further at memory selection points
            if isinstance(self.cache, Recompute):
                yield self.cache.forward(chunk, keep_all)
            elif len(chunk) == 1 and self.decoder is not None and self.decoder.ready(self.cache):
                yield self.decoder.step(self.cache, chunk[0])[None]  # (1, V)
            else:
                # A failed pass leaves layers that committed the chunk: the caller should reset().
                yield forward(self.model, self.cache, torch.tensor([chunk]), keep_all)[0]  # (T, V) or (1, V)


@torch.no_grad()
def feed_together(streams: Sequence[Stream], tokens: Sequence[int]) -> torch.Tensor:
    """Feed one token to each of ``streams`` (of one model, every one ``batchable``) in a single pass; each stream
    goes on exactly as ``feed([token])`` would take it, up to rounding (``backends/batched.py``). -> the logits
    (R, V) that predict each stream's next token"""
    caches = [s.cache for s in streams if s.batchable and isinstance(s.cache, KVCache)]
    if len(caches) < len(streams):
        raise ValueError("a stream that cannot share a pass was given to feed_together")
    for stream, token in zip(streams, tokens, strict=True):
        if stream.memory is not None:  # its text index reads every token, as ``chunks`` notes them
            stream.memory.note(stream.tokens_seen, [int(token)])
    decoder = streams[0].decoder
    if any(s.decoder is not decoder for s in streams):
        decoder = None
    return decode_step(streams[0].model, caches, tokens, decoder)  # (R, V)


def _copy(state):
    """A deep copy of a cache state, whose tensors are the live ones."""
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_copy(v) for v in state)
    return state.clone() if isinstance(state, torch.Tensor) else state
