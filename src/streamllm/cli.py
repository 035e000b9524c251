"""The ``streamllm`` command. Errors a user can cause end in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .arch import UnsupportedModelError
from .cli_experiment import add_parser as add_experiment_parser
from .cli_serve import add_parser as add_serve_parser
from .config import DECODE_MODES, METHODS, POSITIONS, ConfigError, StreamConfig
from .data import DataError
from .models import BUILTINS, DEFAULT_MODEL, DTYPES, ModelError, is_pulled, model_dir, pull
from .sysinfo import current_rss_mb, peak_rss_mb


class InputError(ValueError):
    pass


USER_ERRORS = (InputError, ConfigError, ModelError, UnsupportedModelError, DataError, ValueError)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, HF folder, .gguf file or hub id")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")


def _common(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--num-sinks", type=_non_negative, default=4)
    p.add_argument("--window", type=_positive, default=1020)
    p.add_argument("--method", choices=METHODS, default="sink")
    p.add_argument(
        "--chunk-size", type=_positive, default=512, help="tokens per forward pass for long inputs"
    )
    p.add_argument(
        "--positions",
        choices=POSITIONS,
        default="cache",
        help="sinks seen at in-cache positions (the paper) or at text positions",
    )
    p.add_argument(
        "--decode",
        choices=DECODE_MODES,
        default="fast",
        help="single tokens: fast path (exact), fast path on 4-bit weights, or transformers' forward",
    )


def _sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=_non_negative, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamllm", description="Endless LLM streams with attention sinks.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream generated text")
    _common(g)
    _sampling_args(g, 256)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stats", action="store_true", help="print cache length and speed at the end")

    c = sub.add_parser("chat", help="endless interactive chat (/reset, /stats, /quit)")
    _common(c)
    _sampling_args(c, 512)
    c.add_argument("--script", type=Path, help='JSONL file of user turns ({"content": ...} per line)')
    c.add_argument("--transcript", type=Path, help="write every turn as JSONL here")

    p = sub.add_parser("perplexity", help="streaming next-token perplexity of a text")
    _common(p)
    p.add_argument(
        "--text", type=Path, action="append", required=True, help="UTF-8 text file (repeatable: chained)"
    )
    p.add_argument("--max-tokens", type=_positive, default=None)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--csv", type=Path, help="write per-token rows here (index, nll, running ppl, cache, RSS)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")

    m = sub.add_parser("models", help="list built-in models, or pull one")
    m.add_argument("action", nargs="?", choices=["list", "pull"], default="list")
    m.add_argument("name", nargs="?")

    add_experiment_parser(sub, _model_args, _positive)

    d = sub.add_parser("demo", help="a nonstop chat far past the cache size, with live vital signs")
    _common(d)
    d.set_defaults(window=252)
    d.add_argument("--tokens", type=_positive, default=3000, help="stop after streaming this many tokens")
    add_serve_parser(sub, _common, _positive, _int_at_least)
    return parser


def _config(args) -> StreamConfig:
    return StreamConfig(
        num_sinks=args.num_sinks,
        window=args.window,
        method=args.method,
        chunk_size=args.chunk_size,
        positions=args.positions,
        decode=args.decode,
    )


def _load(args):
    import torch

    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model in BUILTINS and not is_pulled(args.model):
        pull(args.model, progress=lambda msg: print(f"[streamllm] {msg}", file=sys.stderr))
    return load_model(args.model, args.dtype)


def read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"text file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise InputError(f"{path} is empty")
    return text


def _sampling(args):
    from .generate import Sampling

    return Sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args) -> int:
    from .generate import stream_generate

    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    sampling, config = _sampling(args), _config(args)
    model, tokenizer = _load(args)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    last = None
    for event in stream_generate(model, tokenizer, prompt, sampling, config):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        last = event
    sys.stdout.write("\n")
    if args.stats and last:
        print(
            f"[{last.generated} tokens, {last.tok_per_s:.1f} tok/s, cache {last.cache_length}/{config.cache_size}, "
            f"{last.tokens_seen} streamed, finish={last.finish_reason}, peak RSS {peak_rss_mb():.0f} MB]",
            file=sys.stderr,
        )
    return 0


def _script_turns(path: Path) -> list[str]:
    turns = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("content"), str) or not obj["content"].strip():
            raise InputError(f'{path}:{n}: expected an object with a non-empty "content" string')
        turns.append(obj["content"])
    if not turns:
        raise InputError(f"{path} has no turns")
    return turns


def cmd_chat(args) -> int:
    from .chat import ChatSession

    turns = _script_turns(args.script) if args.script else None
    sampling, config = _sampling(args), _config(args)
    model, tokenizer = _load(args)
    session = ChatSession(model, tokenizer, config, sampling)
    transcript = open(args.transcript, "a", encoding="utf-8") if args.transcript else None  # noqa: SIM115
    source = iter(turns) if turns is not None else None
    try:
        while True:
            if source is not None:
                user = next(source, None)
                if user is None:
                    break
                print(f"> {user}")
            else:
                try:
                    user = input("> ")
                except EOFError:
                    break
            command = user.strip()
            if command == "/quit":
                break
            if command == "/reset":
                session.reset()
                print("[conversation reset]")
                continue
            if command == "/stats":
                print(
                    f"[turns {session.turns}, streamed {session.stream.tokens_seen} tokens, cache "
                    f"{session.stream.cache_length}/{config.cache_size}, RSS {current_rss_mb():.0f} MB]"
                )
                continue
            if not command:
                continue
            reply, last = [], None
            for event in session.send(user):
                sys.stdout.write(event.text)
                sys.stdout.flush()
                reply.append(event.text)
                last = event
            sys.stdout.write("\n")
            if transcript:
                row = {
                    "user": user,
                    "assistant": "".join(reply),
                    "tokens_seen": last.tokens_seen,
                    "cache_length": last.cache_length,
                    "tok_per_s": round(last.tok_per_s, 2),
                }
                transcript.write(json.dumps(row) + "\n")
                transcript.flush()
    finally:
        if transcript:
            transcript.close()
    return 0


def output_file(path: Path | None, overwrite: bool) -> Path | None:
    """Check an output path before any work is done: refuse to clobber, need a writable folder."""
    if path is None:
        return None
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise InputError(f"folder does not exist: {path.parent}")
    return path


def cmd_perplexity(args) -> int:
    from tqdm import tqdm

    from .perplexity import perplexity_run

    texts = [read_text(path) for path in args.text]
    csv_path = output_file(args.csv, args.overwrite)
    config = _config(args)
    model, tokenizer = _load(args)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if args.max_tokens and len(ids) >= args.max_tokens:
            break
    ids = ids[: args.max_tokens] if args.max_tokens else ids
    if len(ids) < 2:
        raise InputError("the text has fewer than 2 tokens")
    with tqdm(total=len(ids), unit="tok", file=sys.stderr, disable=None) as bar:
        result = perplexity_run(model, [ids], config, csv_path, on_chunk=bar.update)
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
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"perplexity {result.ppl:.3f} over {len(ids)} tokens ({config.method}, {config.num_sinks}+{config.window}), "
            f"{result.tok_per_s:.1f} tok/s, peak RSS {summary['peak_rss_mb']} MB"
        )
    return 0


def cmd_models(args) -> int:
    if args.action == "pull":
        if not args.name:
            raise InputError("which model? usage: streamllm models pull NAME")
        path = pull(args.name, progress=lambda msg: print(f"[streamllm] {msg}", file=sys.stderr))
        print(path)
        return 0
    for name, m in BUILTINS.items():
        state = f"pulled: {model_dir(name)}" if is_pulled(name) else "not pulled"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}\t{m.description}\t[{state}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="[%(name)s] %(message)s"
    )
    handlers = {
        "generate": cmd_generate,
        "chat": cmd_chat,
        "perplexity": cmd_perplexity,
        "models": cmd_models,
    }
    try:
        if args.command == "experiment":
            from .cli_experiment import run

            return run(args, _load, read_text, InputError)
        if args.command == "serve":
            from .cli_serve import run

            return run(args, _config(args), _load, read_text, InputError)
        if args.command == "demo":
            from .cli_demo import run_demo

            return run_demo(args, _config(args), _load)
        return handlers[args.command](args)
    except USER_ERRORS as exc:
        print(f"streamllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstreamllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
