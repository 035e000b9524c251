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


@torch.no_grad()
def greedy_generate(model, prompt: list[int], cache, new: int) -> tuple[list[int], torch.Tensor]:
    """``model.generate`` with ``cache`` for exactly ``new`` greedy tokens: (the whole sequence, logits (new, V))."""
    out = model.generate(
        torch.tensor([prompt]),
        cache=cache,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences[0].tolist(), torch.stack(out.logits)[:, 0]
