"""Pieces shared by the speed and memory benchmarks: timing single tokens, sampling memory, the machine's bandwidth.

The benchmarks run as scripts (``.venv/bin/python benchmarks/NAME.py``), so this module is imported by name.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from streamllm.data import shakespeare_text, shakespeare_works
from streamllm.sysinfo import current_rss_mb


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(out), help="folder for the CSV, Markdown table and plot")
    return p


def command() -> str:
    return " ".join([".venv/bin/python", *sys.argv])


def text_ids(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the Shakespeare works chained (repeated if need be)."""
    ids: list[int] = []
    for piece in token_pieces(tokenizer):
        ids += piece
        if len(ids) >= n:
            return ids[:n]
    raise AssertionError("unreachable: the pieces repeat forever")


def token_pieces(tokenizer) -> Iterator[list[int]]:
    """The Shakespeare works, one work at a time, tokenized, repeated forever."""
    while True:
        for work in shakespeare_works():
            yield tokenizer.encode(shakespeare_text(work), add_special_tokens=False)


def time_tokens(stream, ids: Sequence[int]) -> list[float]:
    """Seconds taken by each of ``ids`` fed alone, as decoding feeds them."""
    seconds = []
    for token in ids:
        start = time.perf_counter()
        stream.feed([token])
        seconds.append(time.perf_counter() - start)
    return seconds


def median_ms(seconds: Sequence[float]) -> float:
    return 1000 * statistics.median(seconds)


def p90_ms(seconds: Sequence[float]) -> float:
    ordered = sorted(seconds)
    return 1000 * ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


class PeakRSS:
    """Highest process RSS (MB) seen while the block runs, sampled every millisecond by a thread; ``rise`` is
    that peak above the RSS on entry (activations that come and go between samples of a plain RSS reading)."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, current_rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mb())

    @property
    def rise(self) -> float:
        return self.peak - self.start


def read_bandwidth_gbs(megabytes: int = 1024, repeats: int = 5) -> float:
    """Memory read bandwidth (GB/s) over a buffer far larger than the caches: the best of ``repeats`` passes of
    each of two readers, torch's sum and its float32 matrix-vector product (MKL's, which keeps more loads in
    flight: about 25% faster than the sum on the Intel machine of docs/performance.md). With the sum alone, decode
    paths that read as fast as MKL does showed above 100% of their bound."""
    buf = torch.ones(megabytes * 2**20 // 4)
    rows, x = buf.view(-1, 1024), torch.ones(1024)
    best = float("inf")
    for read in (buf.sum, lambda: torch.mv(rows, x)):
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best / 1e9


def weight_bytes(model) -> int:
    """Bytes of the model's parameters, each storage counted once (tied embeddings are one matrix)."""
    seen, total = set(), 0
    for param in model.parameters():
        key = param.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += param.untyped_storage().nbytes()
    return total


def kv_bytes(config, tokens: int, itemsize: int) -> int:
    """Bytes of keys and values for ``tokens`` tokens in every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * tokens * head_dim * itemsize


def itemsize(model) -> int:
    """Bytes per element of the model's weights (and of its cache)."""
    return next(model.parameters()).element_size()
