"""The cost of memory: decode and chunked tok/s with 10K, 100K and 1M tokens of memory behind the cache, beside
plain sink, with peak RSS against the RAM budget and disk bytes per token.

    .venv/bin/python benchmarks/memory.py [--sizes 10240,102400,1048576] [--refresh 64,256] [--dtype bfloat16]

Every stream has 4 sinks + 1020 window and takes the same 2048 tokens of Hamlet first, so its cache is full. A
memory stream is then given ``size`` tokens of memory as whole blocks (``Memory.keep_block``) of random keys and
values: what a block holds does not change what it costs to score, move to disk, read back and attend. Then, side
by side in this one process: the next ``--tokens`` tokens of the text decoded one at a time (decode tok/s, on the
default decode path: the C++ step, and with memory the Python step at each selection point), and 2048 more tokens
fed in chunks (chunked tok/s). Selections happen every ``refresh`` tokens as in any stream, so their cost is in
both figures; at the first size each ``--refresh`` interval is run, since chunks are split at every selection
point. Writes memory.csv and memory.md into --out.
"""

from __future__ import annotations

import time

import torch
from _bench import PeakRSS, command, parser, text_ids, time_tokens

from streamllm import StreamConfig, load_model
from streamllm.config import MemoryConfig
from streamllm.experiments.report import Report, table
from streamllm.runtime.stream import Stream
from streamllm.sysinfo import current_rss_mb

PREFIX = 2048
CHUNKED = 2048


def fill(stream: Stream, tokens: int, generator: torch.Generator) -> None:
    """Give every memory layer ``tokens`` tokens of blocks drawn from a pool of random ones."""
    memory = stream.memory
    store = stream.cache.layers[0]
    _, Hkv, _, D = store.keys.shape
    bs = memory.config.block_size
    pool = torch.randn(64, 2, 1, Hkv, bs, D, generator=generator).to(store.keys.dtype)  # cycled through
    n = 0
    for _ in range(tokens // bs):
        for layer in memory.layers:
            keys, values = pool[n % len(pool)]
            memory.keep_block(layer, keys, values)
            n += 1


def run(model, ids, size: int | None, tokens: int, ram_mb: int, refresh: int = 64) -> dict:
    memory = MemoryConfig(ram_mb=ram_mb, refresh=refresh) if size is not None else None
    stream = Stream(model, StreamConfig(num_sinks=4, window=1020, memory=memory))
    stream.feed(ids[:PREFIX])
    start_rss = current_rss_mb()
    fill_s = 0.0
    if size:
        start = time.perf_counter()
        fill(stream, size, torch.Generator().manual_seed(0))
        fill_s = time.perf_counter() - start
    with PeakRSS() as rss:
        seconds = time_tokens(stream, ids[PREFIX : PREFIX + tokens])
        start = time.perf_counter()
        stream.feed(ids[PREFIX + tokens : PREFIX + tokens + CHUNKED])
        chunked = CHUNKED / (time.perf_counter() - start)
    stats = stream.memory.stats() if stream.memory else {}
    row = {
        "memory_tokens": size or 0,
        "refresh": refresh if size else "",
        "decode": len(seconds) / sum(seconds),
        "chunked": chunked,
        "peak_rss_mb": rss.peak,
        "rss_rise_mb": rss.peak - start_rss,
        "ram_mb": stats.get("ram_bytes", 0) / 2**20,
        "disk_mb": stats.get("disk_bytes", 0) / 2**20,
        "disk_bytes_per_token": _disk_per_token(stats, stream),
        "fill_s": fill_s,
    }
    if stream.memory:
        stream.memory.close()
    return row


def _disk_per_token(stats: dict, stream: Stream) -> float:
    """Bytes in the memory file per token whose blocks are there (each entry is one layer's block)."""
    if not stats or not stats["layer_blocks_on_disk"]:
        return 0.0
    tokens = stats["layer_blocks_on_disk"] / len(stream.memory.layers) * stream.memory.config.block_size
    return stats["disk_bytes"] / tokens


def main() -> None:
    p = parser(__doc__, "docs/performance")
    p.add_argument("--sizes", default="10240,102400,1048576", help="tokens of memory, comma-separated")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded one at a time per stream")
    p.add_argument("--ram-mb", type=int, default=MemoryConfig().ram_mb)
    p.add_argument(
        "--refresh",
        default="64,256",
        help="selection intervals: all at the first size, the first at the others",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.dtype)
    ids = text_ids(tokenizer, PREFIX + args.tokens + CHUNKED)
    sizes = [int(s) for s in args.sizes.split(",")]
    refreshes = [int(r) for r in args.refresh.split(",")]
    runs = [(sizes[0], r) for r in refreshes] + [(size, refreshes[0]) for size in sizes[1:]]
    rows = [run(model, ids, None, args.tokens, args.ram_mb)]
    base = rows[0]
    for size, refresh in runs:
        rows.append(run(model, ids, size, args.tokens, args.ram_mb, refresh))
        r = rows[-1]
        print(
            f"memory {size}, refresh {refresh}: decode {r['decode']:.1f} tok/s ({r['decode'] / base['decode']:.2f}x sink), chunked "
            f"{r['chunked']:.0f} tok/s ({r['chunked'] / base['chunked']:.2f}x), peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"memory RAM {r['ram_mb']:.0f} MB, disk {r['disk_mb']:.0f} MB",
            flush=True,
        )
    header = (
        "memory tokens",
        "refresh",
        "decode tok/s",
        "vs sink",
        "chunked tok/s",
        "vs sink",
        "peak RSS MB",
        "memory RAM MB",
        "memory disk MB",
        "disk bytes/token",
    )
    table_rows = [
        (
            r["memory_tokens"] or "none (plain sink)",
            r["refresh"],
            round(r["decode"], 1),
            f"{r['decode'] / base['decode']:.2f}x",
            round(r["chunked"]),
            f"{r['chunked'] / base['chunked']:.2f}x",
            round(r["peak_rss_mb"]),
            round(r["ram_mb"]),
            round(r["disk_mb"]),
            round(r["disk_bytes_per_token"]),
        )
        for r in rows
    ]
    report = Report(
        "memory",
        f"The cost of memory ({args.model}, {args.dtype}, cache 4+1020, RAM budget {args.ram_mb} MiB)",
        command(),
        list(rows[0]),
        [list(r.values()) for r in rows],
    )
    report.sections.append(table(header, table_rows))
    for path in report.write(args.out):
        print(path)


if __name__ == "__main__":
    main()
