"""One pass that decodes the next token of several streams at once (``streamllm serve --batch-decode``).

Every stream keeps its own ``KVCache`` at its own positions and plans its token itself. Streams that share one
native fast decoder go through its ``step_many``: every weight is read once for all of them, and each attends over
its own cache in place. Others go through the model's forward with one row per stream: the matrix products are
batched, and each row's attention runs on its own cache and plan (``hf.streamllm_attention``), exactly as a single
stream's would. Only bounded caches whose layers share one policy are batched; ``batchable`` says which.
A cache with a memory joins between selection points: its recalled keys sit in its own scratch slots, which the
native step reads like the rest of its cache (a token that selects goes alone, through the Python step), and
it goes through the native step, or alone through the forward, never in a forward batch.

Batched arithmetic rounds differently from single-row arithmetic, so a greedy reply can depend on which other
streams shared its steps; that is why batching is opt-in.

Letters: R streams in the batch, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.cache import KVCache
from .decode import Decoder
from .hf import forward


def batchable(cache) -> bool:
    """Whether a stream with this cache can join a batched decode step."""
    return (
        isinstance(cache, KVCache)
        and (cache.memory is None or not cache.memory.due(cache.seen))
        and cache.uniform
        and cache.policy.capacity is not None
        and all(layer.keys is not None for layer in cache.layers)
    )


@torch.no_grad()
def decode_step(
    model, caches: Sequence[KVCache], tokens: Sequence[int], decoder: Decoder | None = None
) -> torch.Tensor:
    """Feed one token to each of ``caches`` in a single pass. -> next-token logits (R, V)"""
    room = caches[0].layers[0].recall_slots
    if decoder is not None and all(
        decoder.batches(c) and c.policy == caches[0].policy and c.layers[0].recall_slots == room
        for c in caches
    ):
        return decoder.step_many(caches, tokens)  # (R, V)
    ids = torch.tensor([[t] for t in tokens])  # (R, 1)
    if any(c.memory is not None for c in caches):
        return torch.cat(
            [forward(model, c, ids[r : r + 1], keep_all=False)[:, -1] for r, c in enumerate(caches)]
        )
    return forward(model, list(caches), ids, keep_all=False)[:, -1]  # (R, V)
