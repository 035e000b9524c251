"""``streamllm perplexity``: streaming next-token perplexity of a text, in exact chunks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..sysinfo import peak_rss_mb
from .common import (
    InputError,
    load,
    memory_line,
    memory_stats,
    output_file,
    path_choice,
    path_info,
    path_line,
    positive,
    read_text,
    stream_args,
    stream_config,
)


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="streaming next-token perplexity of a text")
    stream_args(p)
    p.add_argument(
        "--text", type=Path, action="append", required=True, help="UTF-8 text file (repeatable: chained)"
    )
    p.add_argument("--max-tokens", type=positive, default=None)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--csv", type=Path, help="write per-token rows here (index, nll, running ppl, cache, RSS)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..runtime.perplexity import perplexity_run
    from ..runtime.stream import Stream
    from ..runtime.tokens import encode

    texts = [read_text(path) for path in args.text]
    csv_path = output_file(args.csv, args.overwrite)
    config = stream_config(args)
    model, tokenizer = load(args)
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(tokenizer, text, first=not ids, bos=args.bos))
        if args.max_tokens and len(ids) >= args.max_tokens:
            break
    ids = ids[: args.max_tokens] if args.max_tokens else ids
    if len(ids) < 2:
        raise InputError("the text has fewer than 2 tokens")
    stream = Stream(model, config)
    with tqdm(total=len(ids), unit="tok", file=sys.stderr, disable=None) as bar:
        result = perplexity_run(model, [ids], config, csv_path, on_chunk=bar.update, stream=stream)
    summary = {
        "ppl": round(result.ppl, 4),
        "tokens": len(ids),
        "method": config.method,
        "num_sinks": config.num_sinks,
        "window": config.window,
        "positions": config.positions,
        "model": args.model,
        "tok_per_s": round(result.tok_per_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "memory": memory_stats(stream),
        "path": path_info(stream, path_choice(args)),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"perplexity {result.ppl:.3f} over {len(ids)} tokens ({config.method}, {config.num_sinks}+{config.window}), "
            f"{result.tok_per_s:.1f} tok/s, peak RSS {summary['peak_rss_mb']} MB, "
            f"{path_line(stream, path_choice(args))}{memory_line(stream)}"
        )
    return 0
