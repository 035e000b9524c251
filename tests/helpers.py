import torch

from streamllm import SinkCache, StreamConfig


@torch.no_grad()
def engine_logits(model, ids, config: StreamConfig, chunk: int):
    """Logits (N, V) of streaming ``ids`` through a SinkCache in chunks of ``chunk`` tokens; and the cache."""
    cache = SinkCache(config=config)
    rows = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        cache.maybe_rebase(len(part))
        out = model(
            input_ids=torch.tensor([part]),
            position_ids=cache.position_ids(len(part)),
            cache=cache,
            use_cache=True,
        )
        rows.append(out.logits[0].float())
        for layer in cache.layers:
            assert layer.keys.shape[2] <= (config.policy().capacity or 10**9)
    return torch.cat(rows), cache
