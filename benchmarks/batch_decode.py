"""Does batching decode steps across sessions pay? One pass over B sessions against B single-session steps.

Each of B sessions has a full cache of its own. Three ways to decode one token for each of them, side by side:
B separate single-token steps on the fast path (the server's default), ``streamllm.backends.batched.decode_step``
through the native step over all B caches at once (``--batch-decode`` on the fast path: every weight read once
for all sessions, each attending over its own cache in place), and the same ``decode_step`` through transformers'
forward with one row per session (``--batch-decode`` with ``--decode transformers``: the matrix products are
batched, each row attends over its own cache).

    python benchmarks/batch_decode.py --window 1020 --batches 1,4,8,16 --threads 1 [--dtype bfloat16] [--memory]

With ``--memory`` every session has a memory (the server's default), fed 4096 tokens past its window first so
that it holds blocks and recalls some; the sessions go through ``feed_together`` as the server's scheduler calls
it, a session whose token selects from memory going alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from streamllm import Stream, StreamConfig, load_model
from streamllm.backends.batched import decode_step
from streamllm.config import MemoryConfig
from streamllm.runtime.stream import feed_together

MEMORY_FEED = 4096  # tokens fed past the window with --memory, so that the memory holds blocks


def step_time(model, rows: int, config: StreamConfig, steps: int, together: bool) -> float:
    """Median seconds to decode one token for each of ``rows`` separate streams whose caches are full."""
    fed = config.cache_size + (MEMORY_FEED if config.memory else 0)
    prompt = torch.randint(100, 1000, (fed + steps,), generator=torch.Generator().manual_seed(0)).tolist()
    streams = [Stream(model, config) for _ in range(rows)]
    for stream in streams:
        stream.feed(prompt[:fed])
    times = []
    for step in range(steps):
        token = prompt[fed + step]
        begin = time.perf_counter()
        if together and config.memory:
            group = [s for s in streams if s.batchable]
            if len(group) > 1:
                feed_together(group, [token] * len(group))
            for stream in streams:
                if len(group) < 2 or stream not in group:
                    stream.feed([token])
        elif together:
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
    p.add_argument("--memory", action="store_true", help="every session with a memory (the server's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype)
    memory = MemoryConfig() if args.memory else None
    fast = StreamConfig(num_sinks=4, window=args.window, decode="fast", memory=memory)
    slow = dataclasses.replace(fast, decode="transformers")
    print(
        f"{args.model} {args.dtype}, cache {fast.cache_size}{', memory' if memory else ''}, "
        f"{torch.get_num_threads()} threads; tok/s over all sessions"
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
