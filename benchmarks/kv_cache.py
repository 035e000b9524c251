"""The 8-bit key/value cache against the model-dtype one: perplexity on real text, bytes and RSS per session, and
decode speed at cache sizes from 1K to 8K.

    .venv/bin/python benchmarks/kv_cache.py [--ppl-tokens 8192] [--sizes 1024,2048,4096,8192] [--tokens 32]

- Perplexity: the Shakespeare works chained, ``--ppl-tokens`` of them, streamed through a 4+1020 sink cache in
  float32 (the reference dtype), chunked (which gives the token-by-token losses), once per kv dtype.
- Bytes per session: the cache of a stream holding 4+1020 tokens (``Stream.cache_bytes``, scratch slots and scales
  included), and the RSS that ``--sessions`` such streams add to the process (each restored from one filled
  stream's state), per model dtype and kv dtype; sessions per GB follow from the RSS.
- Decode speed: for each cache size a stream of 4 sinks and size - 4 window takes size tokens of text (so its
  cache is full), then ``--tokens`` tokens one at a time. The 8-bit stream starts from the same state, converted
  (``load_state_dict``), so both decode the same text side by side in this process. Rows for float32 with the fast
  step and for the default path of this CPU (``--dtype auto --decode auto``).
Writes kv_cache.csv, kv_cache.md and kv_cache.png into --out.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc

import torch
from _bench import command, parser, text_ids, time_tokens

from streamllm import StreamConfig, load_model
from streamllm.defaults import choose
from streamllm.experiments.report import Report, figure, table
from streamllm.runtime.perplexity import streaming_nll
from streamllm.runtime.stream import Stream
from streamllm.sysinfo import current_rss_mb

KV = ("model", "int8")
CACHE = StreamConfig(num_sinks=4, window=1020, chunk_size=512)


def perplexity(model, ids: list[int]) -> dict[str, float]:
    return {
        kv: float(streaming_nll(model, ids, dataclasses.replace(CACHE, kv_dtype=kv)).nll.mean().exp())
        for kv in KV
    }


def settled_rss_mb() -> float:
    """RSS once freed memory has gone back to the system (glibc keeps freed blocks until trimmed)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reading may include freed blocks
        pass
    return current_rss_mb()


def per_session(model, ids: list[int], sessions: int, decode: str) -> dict[str, dict]:
    """Cache bytes of one full 4+1020 stream and the RSS each of ``sessions`` more adds, per kv dtype."""
    out = {}
    for kv in KV:
        config = dataclasses.replace(CACHE, kv_dtype=kv, decode=decode)
        source = Stream(model, config)
        source.feed(ids[:1024])
        state = source.cache.state_dict()
        before = settled_rss_mb()
        kept = []
        for _ in range(sessions):
            stream = Stream(model, config)
            stream.cache.load_state_dict(state)
            kept.append(stream)
        rss = (settled_rss_mb() - before) / sessions
        out[kv] = {"cache_mb": source.cache_bytes() / 2**20, "rss_mb": rss}
        del kept, source, state
        gc.collect()
    return out


def decode_speed(model, ids: list[int], size: int, tokens: int, decode: str) -> dict[str, float]:
    """Decode tok/s at a full cache of ``size`` tokens, per kv dtype, from one prefilled state."""
    config = dataclasses.replace(CACHE, window=size - 4, decode=decode)
    full = Stream(model, config)
    full.feed(ids[:size])
    state = full.cache.state_dict()
    eight = Stream(model, dataclasses.replace(config, kv_dtype="int8"))
    eight.cache.load_state_dict(state)
    streams = {"model": full, "int8": eight}
    seconds = {kv: [] for kv in KV}
    for start in range(size, size + tokens, 8):  # interleaved, so that both see the same machine
        for kv in KV:
            seconds[kv] += time_tokens(streams[kv], ids[start : start + 8])
    return {kv: len(s) / sum(s) for kv, s in seconds.items()}


def main() -> None:
    p = parser(__doc__, "docs/performance")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--sizes", default="1024,2048,4096,8192")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--sessions", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    auto = choose(args.model, "auto", "auto", False)
    paths = [("float32", "fast"), (auto.dtype, auto.decode)]
    paths = list(dict.fromkeys(paths))
    rows = []

    model, tokenizer = load_model(args.model, dtype="float32")
    ids = text_ids(tokenizer, max(args.ppl_tokens, max(sizes) + args.tokens))
    ppl = perplexity(model, ids[: args.ppl_tokens])
    cost = 100 * (ppl["int8"] / ppl["model"] - 1)
    print(
        f"perplexity over {args.ppl_tokens} tokens, 4+1020, float32: {ppl} (8-bit cache {cost:+.2f}%)",
        flush=True,
    )

    for dtype, decode in paths:
        if dtype != "float32":
            del model
            gc.collect()
            model, _ = load_model(args.model, dtype=dtype)
        sessions = per_session(model, ids, args.sessions, decode)
        for kv, s in sessions.items():
            print(
                f"{dtype} {decode}, kv {kv}: cache {s['cache_mb']:.1f} MiB, RSS {s['rss_mb']:.1f} MiB/session",
                flush=True,
            )
        for size in sizes:
            speed = decode_speed(model, ids, size, args.tokens, decode)
            ratio = speed["int8"] / speed["model"]
            print(
                f"{dtype} {decode}, cache {size}: decode {speed['model']:.1f} tok/s (model kv) "
                f"{speed['int8']:.1f} tok/s (int8 kv), {ratio:.2f}x",
                flush=True,
            )
            for kv in KV:
                rows.append(
                    (dtype, decode, kv, size, round(speed[kv], 1), round(sessions[kv]["cache_mb"], 2),
                     round(sessions[kv]["rss_mb"], 1), round(ppl[kv], 3))
                )  # fmt: skip
    _write(rows, ppl, cost, args, paths)


def _write(rows, ppl, cost, args, paths) -> None:
    header = (
        "dtype",
        "decode path",
        "kv dtype",
        "cache size",
        "decode tok/s",
        "cache MiB (4+1020)",
        "RSS MiB per session",
        "float32 perplexity",
    )
    report = Report("kv_cache", f"8-bit key/value cache ({args.model})", command(), header, rows)
    report.sections.append(
        f"Perplexity over {args.ppl_tokens} tokens of the Shakespeare works, cache 4+1020, float32: "
        f"{ppl['model']:.3f} with the model-dtype cache, {ppl['int8']:.3f} with the 8-bit one ({cost:+.2f}%)."
    )
    summary = []
    for dtype, decode in paths:
        mine = [r for r in rows if r[0] == dtype and r[1] == decode]
        by = {(r[2], r[3]): r for r in mine}
        first = sorted({r[3] for r in mine})
        per_gb = {kv: 1024 / by[(kv, first[0])][6] for kv in KV}
        summary.append(
            f"- {dtype}, {decode} decode: {by[('model', first[0])][5]:.1f} MiB -> {by[('int8', first[0])][5]:.1f} MiB "
            f"of cache per 4+1020 session; by RSS {per_gb['model']:.0f} -> {per_gb['int8']:.0f} sessions per GiB "
            f"({per_gb['int8'] / per_gb['model']:.1f}x). Decode int8/model: "
            + ", ".join(f"{s}: {by[('int8', s)][4] / by[('model', s)][4]:.2f}x" for s in first)
        )
    report.sections.append("\n".join(summary))
    report.sections.append(table(header, rows))
    fig, axes = figure(1, 1)
    ax = axes[0][0]
    for dtype, decode in paths:
        for kv, style in zip(KV, ("-", "--"), strict=True):
            mine = [r for r in rows if r[0] == dtype and r[1] == decode and r[2] == kv]
            ax.plot(
                [r[3] for r in mine],
                [r[4] for r in mine],
                style,
                marker="o",
                label=f"{dtype} {decode}, kv {kv}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache size (tokens)")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"Decode speed by cache size and kv dtype ({args.model})")
    ax.legend()
    report.figure = fig
    for path in report.write(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
