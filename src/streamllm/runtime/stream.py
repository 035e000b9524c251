"""``Stream``: one endless stream of tokens through a model, under one of the paper's methods.

``feed`` takes any number of new tokens and processes them in chunks of ``chunk_size``; every token inside a
chunk sees exactly what it would see if fed alone (the cache's plan says what), so a long prompt never silently
gets dense attention. Single tokens go through the model's fast decode step where it has one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..backends.decode import decoder_for
from ..backends.hf import cache_for, forward, prepare
from ..config import StreamConfig
from ..core.cache import Evicted, KVCache
from ..core.policy import Policy
from .recompute import Recompute


class Stream:
    """A model, a configuration and the state of one stream: a ``KVCache`` (or ``Recompute``'s window).

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
        weights = {"fast": "model", "int4": "int4"}.get(self.config.decode)  # config.decode: see StreamConfig
        recompute = self.config.method == "recompute"  # rebuilds every window through the model
        self.decoder = decoder_for(self.model, weights) if weights and not recompute else None
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
        fast step (or the method rebuilds every window)."""
        return self.config.decode if self.decoder is not None else "transformers"

    @property
    def tokens_seen(self) -> int:
        return self.cache.seen

    @property
    def cache_length(self) -> int:
        """Tokens held in the cache now (recompute: in its context window)."""
        return self.cache.cache_length()

    def cache_bytes(self) -> int:
        return self.cache.memory_bytes()

    @property
    def memory(self):
        """The stream's ``core.memory.Memory``, or None."""
        return getattr(self.cache, "memory", None)

    def snapshot(self) -> dict:
        """A copy of this stream's state, to come back to with ``rewind`` (ask a question, then take it back)."""
        if isinstance(self.cache, Recompute):
            raise ValueError("a recompute stream keeps no state to snapshot")
        return _copy(self.cache.state_dict())

    def rewind(self, state: dict) -> None:
        """Go back to a ``snapshot`` of this stream: the cache as it was, and the memory rolled back in place (the
        blocks kept since are dropped, the older ones stay where they are)."""
        memory = self.memory
        self.reset()
        if memory is not None:
            self.cache.memory.close()
            self.cache.memory = memory
        self.cache.load_state_dict(_copy(state))

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
        last = None
        for logits in self.chunks(ids, keep_all=False):
            last = logits
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


def _copy(state):
    """A deep copy of a cache state, whose tensors are the live ones."""
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_copy(v) for v in state)
    return state.clone() if isinstance(state, torch.Tensor) else state
