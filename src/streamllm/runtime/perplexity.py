"""Streaming next-token perplexity of a token stream under a method, computed in large exact chunks.

Every token inside a chunk sees exactly what it would see when streamed alone (the attention mask comes from the
cache policy), so the per-token losses equal the token-by-token ones while running tens of times faster.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import StreamConfig
from ..sysinfo import current_rss_mb
from .recompute import RECOMPUTE_BATCH_TOKENS, context_prefix
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


def held_after(config: StreamConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens the cache (or recompute's context) holds once ``tokens`` (N,) tokens have been processed. (N,)"""
    if config.method == "dense":
        return tokens
    return tokens.clamp(max=config.cache_size)


@torch.no_grad()
def iter_nll(
    model, pieces: Iterable[Sequence[int]], config: StreamConfig, stream: Stream | None = None
) -> Iterator[torch.Tensor]:
    """Stream token ``pieces`` (any sizes, chained into one stream) through a fresh stream (or ``stream``, made
    by the caller from ``config``, who can then read its state).

    Yields the NLLs (n,) of successive tokens, starting with the stream's second token, one chunk at a time, so
    memory stays flat however long the stream is.
    """
    stream = stream or Stream(model, config)
    buf: list[int] = []
    C = config.chunk_size
    for piece in pieces:
        buf.extend(int(i) for i in piece)
        while len(buf) > C:
            yield _chunk_nll(stream, buf[:C], buf[1 : C + 1])
            del buf[:C]
    if len(buf) > 1:
        yield _chunk_nll(stream, buf[:-1], buf[1:])


def _chunk_nll(stream: Stream, chunk: list[int], targets: list[int]) -> torch.Tensor:
    (logits,) = stream.chunks(chunk)  # (T, V): the chunk is at most chunk_size long
    return _target_nll(logits, targets)  # (T,)


def streaming_nll(
    model, ids: Sequence[int], config: StreamConfig, on_chunk: Callable[[int], None] | None = None
) -> PerplexityResult:
    """Per-token NLL of ``ids`` streamed through a fresh stream (see ``iter_nll``)."""
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    out = []
    start = time.perf_counter()
    for nll in iter_nll(model, [ids], config):
        out.append(nll)
        if on_chunk:
            on_chunk(nll.numel() + (len(out) == 1))
    return PerplexityResult(torch.cat(out), time.perf_counter() - start)


@dataclass
class RunningPerplexity:
    """Constant-memory totals of a run: tokens scored (every token but the first), their summed NLL, time."""

    tokens: int = 0
    total_nll: float = 0.0
    seconds: float = 0.0

    @property
    def ppl(self) -> float:
        return math.exp(self.total_nll / self.tokens) if self.tokens else float("nan")

    @property
    def tok_per_s(self) -> float:
        return (self.tokens + 1) / self.seconds if self.seconds else 0.0


CSV_HEADER = ("index", "nll", "running_ppl", "cache_length", "rss_mb")


def perplexity_run(
    model,
    pieces: Iterable[Sequence[int]],
    config: StreamConfig,
    csv_path: Path | None = None,
    on_chunk: Callable[[int], None] | None = None,
    stream: Stream | None = None,
) -> RunningPerplexity:
    """Stream ``pieces`` and total the losses in constant memory; with ``csv_path``, write one row per token:
    its index in the stream, NLL, the running perplexity so far, the cache length it was predicted from and the
    process RSS in MB (sampled once per chunk). Rows are flushed chunk by chunk, so a cut-short run keeps them."""
    run = RunningPerplexity()
    start = time.perf_counter()
    with open(csv_path, "w", newline="") if csv_path else contextlib.nullcontext() as f:
        writer = csv.writer(f) if f else None
        if writer:
            writer.writerow(CSV_HEADER)
        for nll in iter_nll(model, pieces, config, stream):
            first = run.tokens + 1  # stream index of this chunk's first scored token
            running = torch.exp(
                (run.total_nll + nll.double().cumsum(0)) / torch.arange(first, first + len(nll))
            )
            run.tokens += nll.numel()
            run.total_nll += float(nll.double().sum())
            if f is not None and writer is not None:
                index = torch.arange(first, first + len(nll))  # (n,)
                held = held_after(config, index)  # the token at index i is predicted after i tokens
                rss = round(current_rss_mb(), 1)
                writer.writerows(
                    (i, f"{x:.6f}", f"{p:.4f}", h, rss)
                    for i, x, p, h in zip(
                        index.tolist(), nll.tolist(), running.tolist(), held.tolist(), strict=True
                    )
                )
                f.flush()
            if on_chunk:
                on_chunk(nll.numel() + (first == 1))
    run.seconds = time.perf_counter() - start
    return run


@torch.no_grad()
def recompute_nll(
    model,
    ids: Sequence[int],
    cache_size: int,
    targets: Sequence[int],
    on_batch: Callable[[int], None] | None = None,
    prefix: Sequence[int] | None = None,
) -> torch.Tensor:
    """NLL (len(targets),) of the tokens at stream indices ``targets`` (each >= 1) under sliding window with
    re-computation, the ``recompute`` method: token j is predicted from the ``cache_size + 1`` tokens before it
    (what token j - 1 sees when it is processed), rebuilt from scratch. For sampling a long stream.
    ``prefix`` starts every full context in place of its oldest tokens; by default the stream's BOS, when it
    starts with one (``recompute.context_prefix``), as ``--method recompute`` does."""
    if prefix is None:
        prefix = context_prefix(model, ids)
    out: dict[int, torch.Tensor] = {}
    full = [j for j in targets if j - 1 >= cache_size]
    for j in (j for j in targets if j - 1 < cache_size):  # the stream's start: shorter contexts, one by one
        logits = model(input_ids=torch.tensor([list(ids[:j])]), use_cache=False, logits_to_keep=1).logits
        out[j] = _target_nll(logits[:, -1], [ids[j]])[0]
        if on_batch:
            on_batch(1)
    per_batch = max(1, RECOMPUTE_BATCH_TOKENS // (cache_size + 1))
    for b in range(0, len(full), per_batch):
        group = full[b : b + per_batch]
        P = len(prefix)
        contexts = torch.tensor([[*prefix, *ids[j - 1 - cache_size + P : j]] for j in group])  # (b, C+1)
        logits = model(input_ids=contexts, use_cache=False, logits_to_keep=1).logits[:, -1]  # (b, V)
        out.update(zip(group, _target_nll(logits, [ids[j] for j in group]), strict=True))
        if on_batch:
            on_batch(len(group))
    return torch.stack([out[j] for j in targets])


def _target_nll(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets), reduction="none")  # (n,)
