"""`streamllm demo` (part of the CLI): a nonstop conversation far past the cache size, showing speed, cache length and memory."""

from __future__ import annotations

import itertools
import sys
import time

from ..runtime.chat import ChatSession
from ..runtime.generate import Sampling
from ..sysinfo import current_rss_mb
from .common import load, path_choice, path_line, positive, stream_args, stream_config

PROMPTS = [
    "Tell me a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain, step by step, how a bicycle stays upright while moving.",
    "Describe a busy market in an old harbour town, with all its sounds and smells.",
    "What happened next to the lighthouse keeper? Continue the story in detail.",
    "Write a letter from a young sailor to his sister about his first voyage.",
    "Give me ten practical tips for growing tomatoes on a small balcony, and explain each one.",
    "Summarise our conversation so far, then tell me a new story about a clockmaker.",
]


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="a nonstop chat far past the cache size, with live vital signs")
    stream_args(d)
    d.set_defaults(window=252)
    d.add_argument("--tokens", type=positive, default=3000, help="stop after streaming this many tokens")
    d.set_defaults(run=run)


def run(args) -> int:
    config = stream_config(args)
    out = sys.stdout
    print(f"[demo] loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load(args)
    sampling = Sampling(max_new_tokens=300, repetition_penalty=1.1)
    session = ChatSession(model, tokenizer, config, sampling, bos=args.bos)
    cap = config.cache_size
    print(
        f"[demo] {config.method} cache {config.num_sinks}+{config.window} = {cap} tokens; streaming "
        f"{args.tokens} tokens (about {args.tokens / cap:.0f}x the cache) through an endless chat; "
        f"{path_line(session.stream, path_choice(args))}\n",
        file=sys.stderr,
    )
    rows = []
    start = time.perf_counter()
    for turn, prompt in enumerate(itertools.cycle(PROMPTS), 1):
        print(f"\n>>> {prompt}\n", file=out)
        last = None
        for event in session.send(prompt):
            out.write(event.text)
            out.flush()
            last = event
            if event.generated % 25 == 0:
                print(
                    f"\n    [streamed {event.tokens_seen:>6} | cache {event.cache_length:>4}/{cap} | "
                    f"{event.tok_per_s:5.1f} tok/s | RSS {current_rss_mb():6.0f} MB]",
                    file=out,
                )
        if last is None:
            raise RuntimeError("the model gave no reply")
        rows.append(
            (turn, last.tokens_seen, last.cache_length, last.generated, last.tok_per_s, current_rss_mb())
        )
        print(
            f"\n    == turn {turn}: streamed {last.tokens_seen} | cache {last.cache_length}/{cap} | "
            f"{last.tok_per_s:.1f} tok/s | RSS {rows[-1][5]:.0f} MB",
            file=out,
        )
        if last.tokens_seen >= args.tokens:
            break
    elapsed = time.perf_counter() - start
    print("\n== summary ==", file=out)
    print(f"{'turn':>4} {'streamed':>9} {'cache':>6} {'new':>5} {'tok/s':>6} {'RSS MB':>7}", file=out)
    for turn, seen, length, new, tps, rss in rows:
        print(f"{turn:>4} {seen:>9} {length:>6} {new:>5} {tps:>6.1f} {rss:>7.0f}", file=out)
    full = [r for r in rows if r[2] >= cap] or rows
    print(
        f"\nstreamed {rows[-1][1]} tokens ({rows[-1][1] / cap:.1f}x the cache) in {elapsed:.0f} s; cache length stayed "
        f"<= {max(r[2] for r in rows)} (limit {cap}); decode {full[0][4]:.1f} -> {full[-1][4]:.1f} tok/s and RSS "
        f"{full[0][5]:.0f} -> {full[-1][5]:.0f} MB from the first full-cache turn to the last",
        file=out,
    )
    return 0
