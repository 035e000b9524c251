import torch

from streamllm import StreamConfig
from streamllm.backends.hf import cache_for, forward


@torch.no_grad()
def engine_logits(model, ids, config: StreamConfig, chunk: int, policy=None):
    """Logits (N, V) of streaming ``ids`` through a cache made for ``model``, in chunks of ``chunk`` tokens, each
    through transformers' forward; and the cache."""
    cache = cache_for(model, config, policy=policy)
    capacity = (policy or config.policy()).capacity or 10**9
    rows = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        rows.append(forward(model, cache, torch.tensor([part]))[0])
        for layer in cache.layers:
            assert layer.keys.shape[2] <= capacity
            assert layer.length <= capacity
    return torch.cat(rows), cache
