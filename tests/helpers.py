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


def assert_memory_matches_oracle(model, ids, num_sinks: int, window: int, chunk: int = 7):
    """Streaming ``ids`` with a small memory (blocks of 4, 2 recalled) equals the oracle's brute force."""
    from oracle import oracle_logits

    from streamllm.config import MemoryConfig

    memory = MemoryConfig(block_size=4, blocks=2, reps=2, refresh=5)
    ref = oracle_logits(model, ids, num_sinks, window, memory=memory)
    got, _ = engine_logits(model, ids, StreamConfig(num_sinks=num_sinks, window=window, memory=memory), chunk)
    assert (got - ref).abs().max() < 1e-4
