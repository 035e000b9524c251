"""Exact chunked streaming perplexity against feeding one token at a time, side by side in one run.

    .venv/bin/python benchmarks/perplexity_speed.py [--tokens 3100] [--window 1020] [--dtypes float32,bfloat16]

For each dtype: the same stream (Hamlet, several times the cache) is scored one token at a time through
transformers' forward (the reference), one token at a time through the fast decode path, and in chunks; prints the
speeds, the chunked path's speed-up over each, and the largest per-token NLL difference from the reference.
"""

from __future__ import annotations

import argparse

import torch

from streamllm import StreamConfig, load_model
from streamllm.data import shakespeare_text
from streamllm.runtime.perplexity import streaming_nll


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
        f"{'dtype':9} {'1-by-1 transformers':>20} {'1-by-1 fast':>12} {'chunked':>10} {'speed-up':>17} "
        f"{'max |dNLL|':>11} {'mean |dNLL|':>12} {'ppl ref':>8} {'ppl chunked':>11}"
    )
    for dtype in args.dtypes.split(","):
        model, tokenizer = load_model(args.model, dtype=dtype)
        ids = tokenizer.encode(shakespeare_text("hamlet"), add_special_tokens=False)[: args.tokens]

        ref, fast_1, chunked = (
            streaming_nll(model, ids, _config(args, chunk, decode))
            for chunk, decode in ((1, "transformers"), (1, "fast"), (args.chunk_size, "fast"))
        )
        diff = (chunked.nll - ref.nll).abs()
        print(
            f"{dtype:9} {ref.tok_per_s:16.1f} t/s {fast_1.tok_per_s:8.1f} t/s {chunked.tok_per_s:6.1f} t/s "
            f"{chunked.tok_per_s / ref.tok_per_s:7.1f}x / {chunked.tok_per_s / fast_1.tok_per_s:5.1f}x "
            f"{float(diff.max()):11.2e} {float(diff.mean()):12.2e} {ref.ppl:8.3f} {chunked.ppl:11.3f}",
            flush=True,
        )


def _config(args, chunk: int, decode: str) -> StreamConfig:
    return StreamConfig(num_sinks=args.num_sinks, window=args.window, chunk_size=chunk, decode=decode)


if __name__ == "__main__":
    main()
