"""Per-token decode latency and memory of sink, recompute and dense at several cache sizes (paper Fig. 10).

    .venv/bin/python benchmarks/latency.py [--sizes 256,512,1024,2048,4096] [--dtype bfloat16] [--out DIR]

For each cache size C (sink: 4 sinks + C-4 window; recompute: contexts of C tokens; dense: C tokens of context),
the stream is first filled past C tokens of Hamlet in chunks, then ``--steps`` tokens are fed one at a time and
timed (recompute: ``--recompute-steps``, each rebuilds C tokens from scratch). Prints the median and p90 latency,
the cache's analytic size, the peak RSS rise during the timed tokens, and the recompute/sink ratio beside the
paper's (2.0x at 256, 21.7x at 4096, on an A6000). Writes latency.csv, latency.md and latency.png into --out.
"""

from __future__ import annotations

import torch
from _bench import PeakRSS, command, itemsize, kv_bytes, median_ms, p90_ms, parser, text_ids, time_tokens

from streamllm import StreamConfig, load_model
from streamllm.config import DECODE_MODES
from streamllm.experiments.report import Report, figure, table
from streamllm.runtime.stream import Stream

# Paper Fig. 10 (Llama-2-7B, A6000), recompute / sink: 63 vs 31 ms at 256, 1411 vs 65 ms at 4096.
PAPER_RATIO = {256: 2.0, 4096: 21.7}
METHODS = ("sink", "dense", "recompute")


def run_one(model, ids: list[int], method: str, size: int, steps: int, decode: str) -> dict:
    """Fill a stream past ``size`` tokens, then time ``steps`` single tokens."""
    if method == "dense":
        config, fill = StreamConfig(method="dense", decode=decode), size
    else:
        config, fill = StreamConfig(num_sinks=4, window=size - 4, method=method, decode=decode), size + 64
    stream = Stream(model, config)
    stream.feed(ids[:fill])
    with PeakRSS() as rss:
        seconds = time_tokens(stream, ids[fill : fill + steps])
    return {
        "size": size,
        "method": method,
        "median_ms": round(median_ms(seconds), 2),
        "p90_ms": round(p90_ms(seconds), 2),
        "cache_mb": round(stream.cache_bytes() / 2**20, 2),
        "analytic_mb": round(kv_bytes(model.config, stream.cache_length, itemsize(model)) / 2**20, 2),
        "rss_rise_mb": round(rss.rise, 1),
        "peak_rss_mb": round(rss.peak, 1),
        "cache_length": stream.cache_length,
    }


def main() -> None:
    p = parser(__doc__, "docs/performance")
    p.add_argument("--sizes", default="256,512,1024,2048,4096")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--decode", choices=DECODE_MODES, default="fast")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--recompute-steps", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    ids = text_ids(tokenizer, max(sizes) + 64 + max(args.steps, args.recompute_steps))
    print(f"{args.model} {args.dtype}, decode={args.decode}, {args.threads} threads")
    print(
        f"{'size':>5} {'method':10} {'median ms':>10} {'p90 ms':>8} {'cache MB':>9} {'analytic':>9} "
        f"{'RSS rise MB':>12}"
    )
    rows = []
    for size in sizes:
        for method in METHODS:
            steps = args.recompute_steps if method == "recompute" else args.steps
            row = run_one(model, ids, method, size, steps, args.decode)
            rows.append(row)
            print(
                f"{size:5d} {method:10} {row['median_ms']:10.2f} {row['p90_ms']:8.2f} {row['cache_mb']:9.2f} "
                f"{row['analytic_mb']:9.2f} {row['rss_rise_mb']:12.1f}",
                flush=True,
            )
    by = {(r["size"], r["method"]): r for r in rows}
    ratios = [
        (s, round(by[s, "recompute"]["median_ms"] / by[s, "sink"]["median_ms"], 1), PAPER_RATIO.get(s, ""))
        for s in sizes
    ]
    print(
        "recompute / sink latency:",
        ", ".join(f"{s}: {r}x" + (f" (paper {pr}x)" if pr else "") for s, r, pr in ratios),
    )
    report = Report(
        "latency",
        f"Per-token latency and memory against cache size ({args.model}, {args.dtype}, decode={args.decode})",
        command(),
        list(rows[0]),
        [list(r.values()) for r in rows],
    )
    report.sections.append(
        table(
            (
                "cache size",
                "method",
                "median ms/token",
                "p90 ms/token",
                "cache MB allocated",
                "cache MB analytic",
                "peak RSS rise MB",
            ),
            [
                (
                    r["size"],
                    r["method"],
                    r["median_ms"],
                    r["p90_ms"],
                    r["cache_mb"],
                    r["analytic_mb"],
                    r["rss_rise_mb"],
                )
                for r in rows
            ],
        )
    )
    report.sections.append(table(("cache size", "recompute / sink", "paper (A6000)"), ratios))
    report.figure = _plot(rows, sizes, args)
    for path in report.write(args.out):
        print("wrote", path)


def _plot(rows, sizes, args):
    fig, axes = figure(1, 2, size=(11, 4.2))
    lat, mem = axes[0]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        lat.plot(sizes, [r["median_ms"] for r in mine], marker="o", label=method)
        mem.plot(sizes, [r["cache_mb"] + r["rss_rise_mb"] for r in mine], marker="o", label=method)
    for ax in (lat, mem):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("cache size (tokens)")
        ax.legend()
    lat.set_yscale("log")
    lat.set_ylabel("median ms per token")
    mem.set_ylabel("cache + peak RSS rise while decoding (MB)")
    fig.suptitle(f"{args.model} {args.dtype}, {args.threads} threads")
    return fig


if __name__ == "__main__":
    main()
