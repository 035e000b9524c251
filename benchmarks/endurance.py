"""Endurance: a million tokens through one stream, with per-token latency and process memory sampled throughout.

    .venv/bin/python benchmarks/endurance.py [--tokens 1000000] [--every 10000] [--probe 32] [--dtype bfloat16]

How tokens are fed: the Shakespeare works, chained and repeated, go in as 512-token chunks (the exact chunked path,
which is how a long prompt or document enters a stream). Every ``--every`` tokens, the next ``--probe`` tokens of
the text are fed one at a time, as decoding feeds them, and each is timed; the process RSS is read at the same
moment. Acceptance: RSS grows by under 2% from the first sample to the last, and the median latency of
the last 10% of samples is within 10% of the first 10%. Writes endurance.csv, endurance.md and endurance.png.
"""

from __future__ import annotations

import statistics
import time

import torch
from _bench import command, itemsize, kv_bytes, parser, time_tokens, token_pieces

from streamllm import StreamConfig, load_model
from streamllm.config import DECODE_MODES
from streamllm.experiments.report import Report, figure, table
from streamllm.runtime.stream import Stream
from streamllm.sysinfo import current_rss_mb


def main() -> None:
    p = parser(__doc__, "docs/performance")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--every", type=int, default=10_000)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--decode", choices=DECODE_MODES, default="fast")
    p.add_argument("--window", type=int, default=1020)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    rss_loaded = current_rss_mb()  # the model, before any stream exists
    stream = Stream(model, StreamConfig(num_sinks=4, window=args.window, decode=args.decode))
    print(f"{args.model} {args.dtype}, sink 4+{args.window}, decode={args.decode}, {args.threads} threads")
    rows, buffer, start = [], [], time.perf_counter()
    pieces = token_pieces(tokenizer)
    while stream.tokens_seen < args.tokens:
        while len(buffer) < args.every + args.probe:
            buffer += next(pieces)
        chunked, probe, buffer = (
            buffer[: args.every],
            buffer[args.every : args.every + args.probe],
            buffer[args.every + args.probe :],
        )
        stream.feed(chunked)
        seconds = time_tokens(stream, probe)
        row = (
            stream.tokens_seen,
            round(1000 * statistics.median(seconds), 3),
            round(1000 * max(seconds), 3),
            round(current_rss_mb(), 1),
            stream.cache_length,
        )
        rows.append(row)
        print(
            f"{row[0]:>9,} tokens  median {row[1]:6.2f} ms  max {row[2]:6.2f} ms  RSS {row[3]:7.1f} MB  cache {row[4]}",
            flush=True,
        )
    minutes = (time.perf_counter() - start) / 60
    analytic = kv_bytes(model.config, 4 + args.window, itemsize(model)) / 2**20
    memory = [
        ("RSS with the model loaded, before the stream", f"{rss_loaded:.1f} MB"),
        ("cache, analytic (2 x layers x kv heads x 1024 x head dim x bytes)", f"{analytic:.2f} MB"),
        ("cache, allocated (the ring plus 1 scratch slot)", f"{stream.cache_bytes() / 2**20:.2f} MB"),
        ("RSS rise from before the stream to the first sample", f"{rows[0][3] - rss_loaded:.1f} MB"),
    ]
    verdict = _verdict(rows) + memory
    for name, value in verdict:
        print(f"{name}: {value}")
    report = Report(
        "endurance",
        f"Endurance: {rows[-1][0]:,} tokens through one stream ({args.model}, {args.dtype}, sink 4+{args.window})",
        command(),
        ("tokens", "median_ms", "max_ms", "rss_mb", "cache_length"),
        rows,
    )
    report.sections.append(table(("figure", "value"), [*verdict, ("run time", f"{minutes:.1f} min")]))
    step = max(1, len(rows) // 20)
    report.sections.append(
        table(("tokens", "median ms", "max ms", "RSS MB", "cache length"), rows[step - 1 :: step])
    )
    report.figure = _plot(rows, args)
    for path in report.write(args.out):
        print("wrote", path)


def _verdict(rows) -> list[tuple[str, str]]:
    tenth = max(1, len(rows) // 10)
    first, last = (
        statistics.median(r[1] for r in rows[:tenth]),
        statistics.median(r[1] for r in rows[-tenth:]),
    )
    rss_growth = 100 * (rows[-1][3] / rows[0][3] - 1)
    latency_change = 100 * (last / first - 1)
    return [
        ("samples", str(len(rows))),
        (
            "RSS first / last sample",
            f"{rows[0][3]:.1f} / {rows[-1][3]:.1f} MB ({rss_growth:+.2f}%, target under 2%: {'met' if rss_growth < 2 else 'NOT met'})",
        ),
        (
            "median latency, first / last 10% of samples",
            f"{first:.2f} / {last:.2f} ms ({latency_change:+.1f}%, target within 10%: {'met' if abs(latency_change) <= 10 else 'NOT met'})",
        ),
        ("cache length, first / last sample", f"{rows[0][4]} / {rows[-1][4]}"),
    ]


def _plot(rows, args):
    fig, axes = figure()
    ax = axes[0, 0]
    tokens = [r[0] for r in rows]
    ax.plot(tokens, [r[1] for r in rows], color="tab:blue", lw=1)
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("median ms per decoded token", color="tab:blue")
    ax.set_ylim(0, max(r[1] for r in rows) * 1.3)
    mem = ax.twinx()
    mem.plot(tokens, [r[3] for r in rows], color="tab:red", lw=1.2)
    mem.set_ylabel("process RSS (MB)", color="tab:red")
    mem.set_ylim(0, max(r[3] for r in rows) * 1.3)
    ax.set_title(f"{args.model} {args.dtype}: latency and memory over {tokens[-1]:,} tokens")
    return fig


if __name__ == "__main__":
    main()
