"""Does batching decode steps across sessions pay? One pass over B sessions against B single-session steps.

Each of B sessions has a full cache of its own. Three ways to decode one token for each of them, side by side:
B separate single-token steps on the fast path (the server's default), ``streamllm.backends.batched.decode_step``
through the native step over all B caches at once (``--batch-decode`` on the fast path: every weight read once
for all sessions, each attending over its own cache in place), and the same ``decode_step`` through transformers'
forward with one row per session (``--batch-decode`` with ``--decode transformers``: the matrix products are
batched, each row attends over its own cache).

    python benchmarks/batch_decode.py --window 1020 --batches 1,4,8,16 --threads 1 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from streamllm import Stream, StreamConfig, load_model
from streamllm.backends.batched import decode_step


def step_time(model, rows: int, config: StreamConfig, steps: int, together: bool) -> float:
    """Median seconds to decode one token for each of ``rows`` separate streams whose caches are full."""
    prompt = torch.randint(
        100, 1000, (config.cache_size + steps,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    streams = [Stream(model, config) for _ in range(rows)]
    for stream in streams:
        stream.feed(prompt[: config.cache_size])
    times = []
    for step in range(steps):
        token = prompt[config.cache_size + step]
        begin = time.perf_counter()
        if together:
            decode_step(model, [s.cache for s in streams], [token] * rows, streams[0].decoder)
        else:
            for stream in streams:
                stream.feed([token])
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    fast = StreamConfig(num_sinks=4, window=args.window, decode="fast")
    slow = dataclasses.replace(fast, decode="transformers")
    print(
        f"{args.model} {args.dtype}, cache {fast.cache_size}, {torch.get_num_threads()} threads; tok/s over all sessions"
    )
    print(
        "| sessions | one fast step each | decode_step, transformers | decode_step, native | native / one each |"
    )
    print("|---|---|---|---|---|")
    for rows in (int(b) for b in args.batches.split(",")):
        alone = rows / step_time(model, rows, fast, args.steps, together=False)
        stacked = rows / step_time(model, rows, slow, args.steps, together=True)
        native = rows / step_time(model, rows, fast, args.steps, together=True)
        print(f"| {rows} | {alone:.1f} | {stacked:.1f} | {native:.1f} | {native / alone:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
