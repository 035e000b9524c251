"""Can batched decoding be the default? How far one pass over several sessions moves each session's results, set
beside how far the default path already is from the exact float32 one.

B sessions read different stretches of Hamlet through a full cache, then decode ``--tokens`` tokens of the text
each, three ways side by side: one session at a time on the default path (``--dtype``, ``--decode``), all B in
one pass on the same path (``--batch-decode``), and one at a time on the exact float32 path (``--exact``).
For each pair it prints the mean and largest |difference| of the next-token NLL, and how often the greedy choice
differs.

    python benchmarks/batch_agreement.py --dtype bfloat16 --decode int4 --sessions 8 --tokens 64
"""

from __future__ import annotations

import argparse

import torch
from _bench import text_ids

from streamllm import Stream, StreamConfig, load_model
from streamllm.backends.batched import decode_step


def decode(model, prompts: list[list[int]], tokens: list[list[int]], config: StreamConfig, together: bool):
    """Next-token log-probabilities (B, N, V) of feeding ``tokens`` one at a time after ``prompts``."""
    streams = [Stream(model, config) for _ in prompts]
    for stream, prompt in zip(streams, prompts, strict=True):
        stream.feed(prompt)
    rows = []
    for step in range(len(tokens[0])):
        feed = [t[step] for t in tokens]
        if together:
            logits = decode_step(model, [s.cache for s in streams], feed, streams[0].decoder)  # (B, V)
        else:
            logits = torch.stack(
                [s.feed([t]).reshape(-1) for s, t in zip(streams, feed, strict=True)]
            )  # (B, V)
        rows.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.stack(rows, dim=1)  # (B, N, V)


def compare(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, int]:
    """Mean and max |dNLL| of the actual next tokens, and the count of differing greedy choices."""
    nll_a = -a[:, :-1].gather(-1, targets[:, 1:, None])[..., 0]  # (B, N-1)
    nll_b = -b[:, :-1].gather(-1, targets[:, 1:, None])[..., 0]
    d = (nll_a - nll_b).abs()
    return float(d.mean()), float(d.max()), int((a.argmax(-1) != b.argmax(-1)).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--decode", default="int4")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--window", type=int, default=252)
    args = p.parse_args()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    exact, _ = load_model(args.model, dtype="float32")
    cache = 4 + args.window
    ids = text_ids(tokenizer, args.sessions * (cache + args.tokens))
    span = cache + args.tokens
    prompts = [ids[i * span : i * span + cache] for i in range(args.sessions)]
    tokens = [ids[i * span + cache : (i + 1) * span] for i in range(args.sessions)]
    targets = torch.tensor(tokens)
    config = StreamConfig(num_sinks=4, window=args.window, decode=args.decode)
    one = decode(model, prompts, tokens, config, together=False)
    many = decode(model, prompts, tokens, config, together=True)
    ref = decode(exact, prompts, tokens, StreamConfig(num_sinks=4, window=args.window), together=False)
    n = targets.numel()
    print(
        f"{args.model}, {args.sessions} sessions x {args.tokens} tokens, cache {cache}, {torch.get_num_threads()} threads"
    )
    print("| pair | mean |dNLL| | max |dNLL| | greedy choice differs |")
    print("|---|---|---|---|")
    for name, (x, y) in {
        f"batched vs one at a time ({args.dtype}, {args.decode})": (many, one),
        f"one at a time: {args.dtype} {args.decode} vs exact float32": (one, ref),
    }.items():
        mean, top, flips = compare(x, y, targets)
        print(f"| {name} | {mean:.4f} | {top:.4f} | {flips} of {n} |")


if __name__ == "__main__":
    main()
