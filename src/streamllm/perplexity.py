"""Streaming next-token perplexity of a text under a method."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import StreamConfig
from .stream import Stream


@dataclass
class PerplexityResult:
    nll: torch.Tensor  # (N-1,) per-token negative log-likelihood, token 1 onwards
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def tok_per_s(self) -> float:
        return (self.nll.numel() + 1) / self.seconds if self.seconds else 0.0


@torch.no_grad()
def streaming_nll(
    model, ids: Sequence[int], config: StreamConfig, on_chunk: Callable[[int], None] | None = None
) -> PerplexityResult:
    """Stream ``ids`` through a fresh stream; NLL of each token given what the method let the model see."""
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    stream = Stream(model, config)
    ids = list(ids)
    out, done = [], 0
    start = time.perf_counter()
    for logits in stream.chunks(ids):
        T = logits.shape[0]
        targets = torch.tensor(ids[done + 1 : done + T + 1])
        logp = torch.log_softmax(logits[: targets.numel()], dim=-1)  # (T', V)
        out.append(-logp.gather(1, targets[:, None])[:, 0])
        done += T
        if on_chunk:
            on_chunk(T)
    return PerplexityResult(torch.cat(out), time.perf_counter() - start)
