"""Exact chunked streaming perplexity against feeding one token at a time, side by side in one run.

    .venv/bin/python benchmarks/perplexity_speed.py [--tokens 3100] [--window 1020] [--dtypes float32,bfloat16]

For each dtype: the same stream (Hamlet, several times the cache) is scored token by token and in chunks; prints
both speeds, their ratio and the largest per-token NLL difference.
"""

from __future__ import annotations

import argparse

import torch

from streamllm import StreamConfig, load_model
from streamllm.data import shakespeare_text
from streamllm.perplexity import streaming_nll


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=3100)
    p.add_argument("--num-sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.model}, sink {args.num_sinks}+{args.window}, {args.tokens} tokens of Hamlet, {args.threads} threads"
    )
    print(
        f"{'dtype':9} {'token-by-token':>15} {'chunked':>10} {'speed-up':>9} {'max |dNLL|':>11} {'mean |dNLL|':>12} "
        f"{'ppl 1-by-1':>10} {'ppl chunked':>11}"
    )
    for dtype in args.dtypes.split(","):
        model, tokenizer = load_model(args.model, dtype=dtype)
        ids = tokenizer.encode(shakespeare_text("hamlet"), add_special_tokens=False)[: args.tokens]
        config = StreamConfig(num_sinks=args.num_sinks, window=args.window)
        slow = streaming_nll(
            model, ids, StreamConfig(num_sinks=args.num_sinks, window=args.window, chunk_size=1)
        )
        fast = streaming_nll(
            model,
            ids,
            StreamConfig(num_sinks=config.num_sinks, window=config.window, chunk_size=args.chunk_size),
        )
        diff = (fast.nll - slow.nll).abs()
        print(
            f"{dtype:9} {slow.tok_per_s:11.1f} t/s {fast.tok_per_s:6.1f} t/s {fast.tok_per_s / slow.tok_per_s:8.1f}x "
            f"{float(diff.max()):11.2e} {float(diff.mean()):12.2e} {slow.ppl:10.3f} {fast.ppl:11.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
