"""One pass that decodes the next token of several streams at once (``streamllm serve --batch-decode``).

Every stream keeps its own ``KVCache`` at its own positions and plans its token itself. Streams that share one
native fast decoder go through its ``step_many``: every weight is read once for all of them, and each attends over
its own cache in place. Others go through the model's forward with one row per stream: the matrix products are
batched, and each row's attention runs on its own cache and plan (``hf.streamllm_attention``), exactly as a single
stream's would. Only bounded caches whose layers share one policy are batched; ``batchable`` says which.

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
        and cache.memory is None
        and cache.uniform
        and cache.policy.capacity is not None
        and all(layer.keys is not None for layer in cache.layers)
    )


@torch.no_grad()
def decode_step(
    model, caches: Sequence[KVCache], tokens: Sequence[int], decoder: Decoder | None = None
) -> torch.Tensor:
    """Feed one token to each of ``caches`` in a single pass. -> next-token logits (R, V)"""
    if decoder is not None and all(decoder.batches(c) and c.policy == caches[0].policy for c in caches):
        return decoder.step_many(caches, tokens)  # (R, V)
    ids = torch.tensor([[t] for t in tokens])  # (R, 1)
    return forward(model, list(caches), ids, keep_all=False)[:, -1]  # (R, V)
