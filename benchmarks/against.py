"""This checkout against another, side by side: decode ms per token on each path, the two alternating.

    .venv/bin/python benchmarks/against.py OTHER_CHECKOUT [--paths bfloat16:int4,float32:int4] [--rounds 3]

A change to the native kernels needs two builds, so it cannot be timed in one process. Each round runs one process
per checkout and path: the other checkout imports its own ``src`` (PYTHONPATH) and builds its kernels into a folder
of its own (an extra compiler define, ``STREAMLLM_NATIVE_FLAGS``, gives it another build folder). A process loads
the model, fills a 4+1020 cache with Hamlet, then times ``--tokens`` tokens fed one at a time, the model's matrix
products alone, and the native attention kernel alone over every layer of a cache of that size (random numbers of
the model's dtype); it also times the native step's call inside each token, so that the rest (the Python around
it) is a column of its own. Rounds alternate the checkouts so that a machine's drift hits both alike; the table
gives the median of the rounds. Make the other checkout with ``git worktree add /tmp/before <commit>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from streamllm.experiments.report import machine

HERE = Path(__file__).resolve().parent
CACHE = 1024

PROBE = r"""
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[4])
from _bench import text_ids, time_tokens
from streamllm import StreamConfig, load_model
from streamllm.runtime.stream import Stream

dtype, decode, tokens, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
model, tokenizer = load_model("smollm2-135m", dtype=getattr(torch, dtype))
ids = text_ids(tokenizer, cache + tokens)
stream = Stream(model, StreamConfig(num_sinks=4, window=cache - 4, decode=decode))
stream.feed(ids[:cache])
d = stream.decoder
step, inside = d.native, []
def timed(*args):
    start = time.perf_counter()
    out = step(*args)
    inside.append(time.perf_counter() - start)
    return out
d.native = timed
seconds = time_tokens(stream, ids[cache:])
d.native = step
around = [t - n for t, n in zip(seconds, inside)] if len(inside) == len(seconds) else [float("nan")]
mats = [m for layer in d.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [d.lm_head]
widths = [model.config.intermediate_size if m is layer.down else model.config.hidden_size
          for layer in d.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [model.config.hidden_size]
xs = [torch.randn(k, dtype=model.dtype) for k in widths]
runs = []
for _ in range(20):
    start = time.perf_counter()
    for m, x in zip(mats, xs):
        m(x)
    runs.append(time.perf_counter() - start)
from streamllm.backends import native
c = model.config
heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
dim = getattr(c, "head_dim", None) or c.hidden_size // heads
slots = cache + 1
layers = [(torch.randn(kv_heads, slots, dim, dtype=model.dtype), torch.randn(kv_heads, slots, dim, dtype=model.dtype))
          for _ in range(c.num_hidden_layers)]
q, visible, none = torch.randn(heads, dim), torch.ones(slots, dtype=torch.bool), torch.empty(0)
attend = getattr(native.kernels(), "attend", None)  # None without the native kernels (or in old builds)
attention = []
for _ in range(20 if attend else 0):
    start = time.perf_counter()
    for keys, values in layers:
        attend(q, keys, values, none, none, visible, dim**-0.5)
    attention.append(time.perf_counter() - start)
print(json.dumps({"token_ms": 1000 * statistics.median(seconds), "products_ms": 1000 * statistics.median(runs),
                  "around_ms": 1000 * statistics.median(around),
                  "attention_ms": 1000 * statistics.median(attention) if attention else float("nan"),
                  "products_mb": sum(m.nbytes for m in mats) / 1e6}))
"""


def measure(checkout: Path, dtype: str, decode: str, tokens: int, other: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"))
    if other:
        env["STREAMLLM_NATIVE_FLAGS"] = (
            env.get("STREAMLLM_NATIVE_FLAGS", "") + " -DSTREAMLLM_OTHER_CHECKOUT"
        ).strip()
    cmd = [sys.executable, "-c", PROBE, dtype, decode, str(tokens), str(HERE), str(CACHE)]
    result = subprocess.run(cmd, env=env, cwd=checkout, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: {checkout}: {dtype} {decode}: {tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", type=Path, help="the other checkout (a git worktree of another commit)")
    p.add_argument(
        "--paths", default="bfloat16:int4,float32:int4", help="dtype:decode pairs, comma-separated"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args()
    other = args.other.resolve()
    if not (other / "src" / "streamllm").is_dir():
        raise SystemExit(f"error: {other} is not a streamllm checkout (no src/streamllm)")
    if args.rounds < 1 or args.tokens < 1:
        raise SystemExit("error: --rounds and --tokens must be at least 1")
    try:
        paths = [tuple(pair.split(":")) for pair in args.paths.split(",")]
        assert all(len(pair) == 2 for pair in paths)
    except AssertionError:
        raise SystemExit("error: --paths takes dtype:decode pairs, e.g. bfloat16:int4,float32:fast") from None
    this = HERE.parent
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for r in range(args.rounds):
        for dtype, decode in paths:
            for label, checkout, is_other in (("other", other, True), ("this", this, False)):
                got = measure(checkout, dtype, decode, args.tokens, is_other)
                rows.setdefault((dtype, decode, label), []).append(got)
                print(
                    f"round {r + 1}: {label:5} {dtype} {decode}: {got['token_ms']:.2f} ms/token, products "
                    f"{got['products_ms']:.2f} ms, attention {got['attention_ms']:.2f} ms, around the native step "
                    f"{got['around_ms']:.2f} ms",
                    flush=True,
                )
    print(
        f"\nsmollm2-135m, cache 4+{CACHE - 4}, {args.tokens} tokens, median of {args.rounds} alternating rounds"
    )
    print(f"Machine: {machine()}")
    print(f"other: {other}\n")
    columns = ("token_ms", "products_ms", "attention_ms", "around_ms")
    print(
        "| dtype | decode | ms per token, other -> this | products alone | attention alone | "
        "Python around the native step |"
    )
    print("|---|---|---|---|---|---|")
    for dtype, decode in paths:
        a, b = rows[dtype, decode, "other"], rows[dtype, decode, "this"]
        cells = []
        for key in columns:
            before, after = (statistics.median(x[key] for x in v) for v in (a, b))
            cells.append(f"{before:.2f} -> {after:.2f} ({100 * (after / before - 1):+.0f}%)")
        print(f"| {dtype} | {decode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
