"""The cost of memory on real text: decode and chunked tok/s with 10K, 100K and 1M tokens of memory behind the
cache, beside plain sink, with the time to feed that much text, the time of one selection, the text index's RAM
per token, peak RSS against the RAM budget and disk bytes per token.

    .venv/bin/python benchmarks/memory.py [--sizes 10240,102400,1048576] [--refresh 256] [--dtype bfloat16]

Every stream has 4 sinks + 1020 window. A memory stream (content selection) is fed ``size`` tokens of the
Shakespeare works, for real, in pieces of 4096 tokens, so its memory holds the model's own keys and values of
real text and its text index real tokens (``fill s`` and ``fill tok/s`` say what that took). Then, side by side
with a plain sink stream fed the same text (its cost does not depend on how much it was fed, so it is fed 2048
tokens): a question is fed with ``recall=True`` (a new query: its content score reads every block once, and every
layer scores every block), the next ``--tokens`` tokens of the text are decoded one at a time (decode tok/s: the C++ step, and at each selection
point the Python step), and 2048 more are fed in chunks (chunked tok/s). Selections happen every ``refresh``
tokens as in any stream, so their cost is in both figures. Last, ``selection ms`` times one selection alone: the
text index brought up to date and searched for a new question's seeds, and every memory layer's blocks scored
(``Memory.select``) with a query. ``--saved FOLDER`` adds a memory restored, read only, from the stream that
``streamllm experiment passkey`` saved (a million tokens of real text and keys take over an hour to feed; this
times what it holds without feeding it again). Writes memory.csv and memory.md into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _bench import PeakRSS, command, parser, text_ids, time_tokens
from safetensors import safe_open

from streamllm import StreamConfig, load_model
from streamllm.config import MemoryConfig
from streamllm.core.selection import CLOSE
from streamllm.core.textindex import TextIndex, overlap_for, query_terms
from streamllm.experiments.report import Report, table
from streamllm.runtime.stream import Stream
from streamllm.sysinfo import current_rss_mb

PREFIX = 2048  # what the sink stream is fed before it is timed
CHUNKED = 2048
PIECE = 4096
QUESTION = "Who was it that spoke of the ghost of the king, and what did he say about Denmark?"


def run(
    model, tokenizer, ids, size: int | None, tokens: int, ram_mb: int, refresh: int, saved: Path | None = None
) -> dict:
    """One stream timed: plain sink (no ``size``), memory fed ``size`` tokens of ``ids``, or memory restored from
    the stream ``saved`` in a folder of ``streamllm experiment passkey`` (then ``ids`` are what follows it)."""
    memory = MemoryConfig(ram_mb=ram_mb, refresh=refresh, select="content") if size or saved else None
    config = StreamConfig(num_sinks=4, window=1020, memory=memory)
    start = time.perf_counter()
    if saved is not None:
        # Read only: new blocks go to a spill file of their own, never to the saved memory.bin (nothing here
        # calls ``persist``), so the experiment's stream stays as it was.
        stream = Stream(model, config, memory_file=saved / "memory.bin")
        with safe_open(saved / "state.safetensors", "pt") as f:
            stream.load(
                ({name: f.get_tensor(name) for name in f.keys()}, json.loads(f.metadata()["meta"])["state"])
            )
        fed, rest = stream.tokens_seen, ids
        size = stream.memory.stats()["tokens"]
    else:
        stream = Stream(model, config)
        fed = size + 1024 if size else PREFIX  # memory holds what left the window: the window more is fed
        for s in range(0, fed, PIECE):
            stream.feed(ids[s : min(s + PIECE, fed)])
        rest = ids[fed:]
    fill_s = time.perf_counter() - start
    start_rss = current_rss_mb()
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    with PeakRSS() as rss:
        stream.feed(question, recall=True, query=question)
        seconds = time_tokens(stream, rest[:tokens])
        start = time.perf_counter()
        stream.feed(rest[tokens : tokens + CHUNKED])
        chunked = CHUNKED / (time.perf_counter() - start)
    stats = stream.memory.stats() if stream.memory else {}
    select_s = (
        selection_seconds(stream.memory, tokenizer.encode(QUESTION.upper()), model.config.num_attention_heads)
        if size
        else 0.0
    )
    index = stream.memory.text.nbytes() if stream.memory else 0
    row = {
        "memory_tokens": size or 0,
        "restored": saved is not None,
        "refresh": refresh if size else "",
        "fill_s": fill_s,
        "fill_tok_s": fed / fill_s,
        "selection_ms": 1000 * select_s,
        "decode": len(seconds) / sum(seconds),
        "chunked": chunked,
        "index_bytes_per_token": index / size if size else 0.0,
        "peak_rss_mb": rss.peak,
        "rss_rise_mb": rss.peak - start_rss,
        "ram_mb": stats.get("ram_bytes", 0) / 2**20,
        "disk_mb": stats.get("disk_bytes", 0) / 2**20,
        "disk_bytes_per_token": _disk_per_token(stats, stream),
    }
    if stream.memory:
        stream.memory.close()
    return row


def selection_seconds(memory, question: list[int], heads: int) -> float:
    """One selection with a question the index has not seen: its terms looked up in every block, the seeds
    chosen, and every memory layer's blocks scored with a query and chosen."""
    start = time.perf_counter()
    memory.text.sync(memory.blocks)
    memory.seeds = memory.text.seeds(query_terms(question), memory.config.blocks, CLOSE)
    for layer in memory.layers:
        query = torch.randn(1, heads, memory.head_dim, generator=torch.Generator().manual_seed(layer))
        memory.select(layer, query.to(memory.kept.dtype), model_pos=0, anchor=0)
    return time.perf_counter() - start


def counts(text: str) -> list[int]:
    """Token counts, comma-separated (none: an empty string)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = [0]
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give positive token counts, comma-separated ('' for none)"
        )
    return values


def index_cost(ids: list[int], block_size: int, question: list[int]) -> tuple[float, float, float]:
    """The text index alone over ``ids``: (seconds to index every block, ms of one search for a new question's
    seeds, bytes per token)."""
    index = TextIndex(block_size, 4, overlap_for(block_size, 1020))
    index.note(0, ids)
    start = time.perf_counter()
    index.sync((len(ids) - 4) // block_size)
    built = time.perf_counter() - start
    start = time.perf_counter()
    index.seeds(query_terms(question), MemoryConfig().blocks, CLOSE)
    return built, 1000 * (time.perf_counter() - start), index.nbytes() / len(ids)


def _disk_per_token(stats: dict, stream: Stream) -> float:
    """Bytes in the memory file per token whose blocks are there (each entry is one layer's block)."""
    if not stats or not stats["layer_blocks_on_disk"]:
        return 0.0
    tokens = stats["layer_blocks_on_disk"] / len(stream.memory.layers) * stream.memory.config.block_size
    return stats["disk_bytes"] / tokens


def main() -> None:
    p = parser(__doc__, "docs/performance")
    p.add_argument(
        "--sizes", type=counts, default="10240,102400,1048576", help="tokens of memory, comma-separated"
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--tokens",
        type=int,
        default=MemoryConfig().refresh,
        help="tokens decoded one at a time per stream (default: one refresh period, so that the decode figure "
        "holds exactly one selection, as every such stretch of a stream does)",
    )
    p.add_argument("--ram-mb", type=int, default=MemoryConfig().ram_mb)
    p.add_argument("--refresh", type=int, default=MemoryConfig().refresh, help="tokens between selections")
    p.add_argument(
        "--index-sizes",
        type=counts,
        default="1048576",
        help="tokens of text indexed alone (no model: the index's build and search time, and its bytes)",
    )
    p.add_argument(
        "--saved",
        type=Path,
        action="append",
        default=[],
        help="also time a memory restored from this folder of `streamllm experiment passkey` (its stream of up "
        "to a million tokens, saved under $STREAMLLM_HOME/experiments/passkey/), read only (repeatable)",
    )
    args = p.parse_args()
    for folder in args.saved:
        if not (folder / "state.safetensors").is_file() or not (folder / "memory.bin").is_file():
            p.error(f"--saved {folder}: no state.safetensors and memory.bin there")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.dtype)
    sizes = args.sizes
    ids = text_ids(tokenizer, max(sizes, default=0) + 1024 + 256 + args.tokens + CHUNKED)
    rows = []
    for size in [*sizes, *args.saved]:
        base = run(model, tokenizer, ids, None, args.tokens, args.ram_mb, args.refresh)
        if isinstance(size, Path):
            r = run(model, tokenizer, ids, None, args.tokens, args.ram_mb, args.refresh, saved=size)
        else:
            r = run(model, tokenizer, ids, size, args.tokens, args.ram_mb, args.refresh)
        size = r["memory_tokens"]
        r["decode_ratio"], r["chunked_ratio"] = r["decode"] / base["decode"], r["chunked"] / base["chunked"]
        base["decode_ratio"] = base["chunked_ratio"] = 1.0
        rows += [base, r]
        how = "restored" if r["restored"] else "fed"
        print(
            f"memory {size}: {how} in {r['fill_s']:.0f} s ({r['fill_tok_s']:.0f} tok/s); selection "
            f"{r['selection_ms']:.0f} ms; decode {r['decode']:.1f} tok/s ({r['decode_ratio']:.2f}x sink), "
            f"chunked {r['chunked']:.0f} tok/s ({r['chunked_ratio']:.2f}x); index {r['index_bytes_per_token']:.0f} "
            f"B/token; peak RSS {r['peak_rss_mb']:.0f} MB, memory RAM {r['ram_mb']:.0f} MB, disk "
            f"{r['disk_mb']:.0f} MB",
            flush=True,
        )
    header = (
        "memory tokens",
        "fed (restored) in s",
        "selection ms",
        "decode tok/s",
        "vs sink",
        "chunked tok/s",
        "vs sink",
        "index B/token",
        "peak RSS MB",
        "memory RAM MB",
        "memory disk MB",
    )
    table_rows = [
        (
            r["memory_tokens"] or "none (plain sink)",
            (f"({r['fill_s']:.0f})" if r["restored"] else round(r["fill_s"])) if r["memory_tokens"] else "-",
            round(r["selection_ms"]) if r["memory_tokens"] else "-",
            round(r["decode"], 1),
            f"{r['decode_ratio']:.2f}x",
            round(r["chunked"]),
            f"{r['chunked_ratio']:.2f}x",
            round(r["index_bytes_per_token"]) if r["memory_tokens"] else "-",
            round(r["peak_rss_mb"]),
            round(r["ram_mb"]),
            round(r["disk_mb"]),
        )
        for r in rows
    ]
    report = Report(
        "memory",
        f"The cost of memory on real text ({args.model}, {args.dtype}, cache 4+1020, content selection, refresh "
        f"{args.refresh}, RAM budget {args.ram_mb} MiB)",
        command(),
        list(rows[0]) if rows else ["memory_tokens"],
        [list(r.values()) for r in rows],
    )
    if rows:
        report.sections.append(
            "Each memory row follows the plain sink row it was timed beside, in the same process."
        )
        report.sections.append(table(header, table_rows))
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    index_rows = []
    for n in args.index_sizes:
        built, search_ms, per_token = index_cost(text_ids(tokenizer, n), MemoryConfig().block_size, question)
        index_rows.append((n, f"{built:.1f}", f"{search_ms:.0f}", f"{per_token:.1f}"))
        print(
            f"text index of {n} tokens: built in {built:.1f} s, a new question searched in {search_ms:.0f} ms, "
            f"{per_token:.1f} bytes/token",
            flush=True,
        )
    if index_rows:
        report.sections.append("The text index alone, over the same text:")
        report.sections.append(table(("tokens", "indexed in (s)", "search ms", "bytes/token"), index_rows))
    for path in report.write(args.out):
        print(path)


if __name__ == "__main__":
    main()
