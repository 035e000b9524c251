"""Does batching decode steps across sessions pay? One forward over B rows vs B single-row forwards.

Three ways to decode one token for each of B sessions whose caches are full: B separate forwards (the server's
default), one forward of B rows sharing one cache and its positions (the upper bound: real sessions sit at
different positions), and ``streamllm.server.batching.decode_step`` over B separate caches (``--batch-decode``),
which pays for one copy of each cache per step.

    python benchmarks/batch_decode.py --window 1020 --batches 1,4,8,16 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from streamllm import SinkCache, Stream, StreamConfig, load_model
from streamllm.server.batching import decode_step


@torch.no_grad()
def decode_time(model, rows: int, config: StreamConfig, steps: int) -> float:
    """Seconds per decode step for a batch of ``rows`` whose caches are full."""
    cache = SinkCache(config=config)
    prompt = torch.randint(100, 1000, (rows, config.cache_size), generator=torch.Generator().manual_seed(0))
    for start in range(0, prompt.shape[1], 256):
        part = prompt[:, start : start + 256]
        cache.maybe_rebase(part.shape[1])
        positions = cache.position_ids(part.shape[1]).expand(rows, -1)
        model(input_ids=part, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    token = prompt[:, -1:]
    times = []
    for _ in range(steps):
        cache.maybe_rebase(1)
        begin = time.perf_counter()
        logits = model(
            input_ids=token,
            position_ids=cache.position_ids(1).expand(rows, -1),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        times.append(time.perf_counter() - begin)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return sorted(times)[len(times) // 2]


def server_step_time(model, rows: int, config: StreamConfig, steps: int) -> float:
    """Seconds per ``decode_step`` over ``rows`` separate streams whose caches are full."""
    prompt = torch.randint(
        100, 1000, (config.cache_size + steps,), generator=torch.Generator().manual_seed(0)
    )
    streams = [Stream(model, config) for _ in range(rows)]
    for stream in streams:
        stream.feed(prompt[: config.cache_size].tolist())
    times = []
    for step in range(steps):
        begin = time.perf_counter()
        decode_step(model, streams, [int(prompt[config.cache_size + step])] * rows)
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    config = StreamConfig(num_sinks=4, window=args.window)
    single = decode_time(model, 1, config, args.steps)
    print(
        f"cache {config.cache_size}, {torch.get_num_threads()} threads; one row: {single * 1000:.1f} ms/step"
    )
    print(
        "| sessions | one forward each: tok/s | shared positions (bound): tok/s | decode_step: tok/s | gain |"
    )
    print("|---|---|---|---|---|")
    for rows in (int(b) for b in args.batches.split(",")):
        bound = rows / decode_time(model, rows, config, args.steps)
        served = rows / server_step_time(model, rows, config, args.steps)
        print(f"| {rows} | {1 / single:.1f} | {bound:.1f} | {served:.1f} | {served * single:.2f}x |")


if __name__ == "__main__":
    main()
