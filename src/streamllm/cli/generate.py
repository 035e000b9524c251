"""``streamllm generate``: stream generated text."""

from __future__ import annotations

import sys

from ..sysinfo import peak_rss_mb
from .common import (
    InputError,
    load,
    memory_line,
    path_choice,
    path_line,
    sampling,
    sampling_args,
    stream_args,
    stream_config,
)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="stream generated text")
    stream_args(g)
    sampling_args(g, 256)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stats", action="store_true", help="print cache length and speed at the end")
    g.set_defaults(run=run)


def run(args) -> int:
    from ..runtime.generate import stream_generate
    from ..runtime.stream import Stream

    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    options, config = sampling(args), stream_config(args)
    model, tokenizer = load(args)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    last, stream = None, Stream(model, config)
    for event in stream_generate(model, tokenizer, prompt, options, bos=args.bos, stream=stream):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        last = event
    sys.stdout.write("\n")
    if args.stats and last:
        print(
            f"[{last.generated} tokens, {last.tok_per_s:.1f} tok/s, cache {last.cache_length}/{config.cache_size}, "
            f"{last.tokens_seen} streamed, finish={last.finish_reason}, peak RSS {peak_rss_mb():.0f} MB, "
            f"{path_line(stream, path_choice(args))}{memory_line(stream)}]",
            file=sys.stderr,
        )
    return 0
