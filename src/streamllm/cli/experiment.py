"""``streamllm experiment NAME --out DIR``: run one of the paper's experiments and write its CSV, table and plot."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ..experiments import EXPERIMENTS
from .common import InputError, load, memory_args, memory_config, model_args, positive, read_text


def add_parser(sub) -> None:
    e = sub.add_parser(
        "experiment", help="reproduce one of the paper's experiments (CSV, Markdown table, PNG)"
    )
    e.add_argument("name", choices=sorted(EXPERIMENTS))
    e.add_argument("--out", type=Path, required=True, help="folder for NAME.csv, NAME.md and NAME.png")
    e.add_argument("--quick", action="store_true", help="a reduced size that runs in seconds")
    e.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    e.add_argument("--text", type=Path, action="append", default=[], help="UTF-8 text instead of Shakespeare")
    e.add_argument("--tokens", type=positive, default=None, help="stream length instead of the default")
    e.add_argument(
        "--questions", type=Path, default=None, help="chat, sampling: MT-Bench style JSONL of questions"
    )
    e.add_argument(
        "--lengths",
        type=_lengths,
        default=None,
        help="passkey, recall: stream lengths, comma-separated (e.g. 4096,16384)",
    )
    e.add_argument("--keys", type=positive, default=None, help="passkey: keys per cell (default 10)")
    e.add_argument(
        "--methods",
        type=_methods,
        default=None,
        help="passkey, streameval, recall: methods to run, comma-separated (see each experiment's METHODS)",
    )
    e.add_argument(
        "--no-bos",
        dest="bos",
        action="store_false",
        help="do not start streams with BOS (by default they do when the tokenizer adds one)",
    )
    model_args(e, dtype="float32")  # published figures reproduce on any CPU
    memory_args(e)
    e.set_defaults(run=run)


def _lengths(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 256:
        raise argparse.ArgumentTypeError(f"lengths must be integers >= 256, got {text!r}")
    return values


def _methods(text: str) -> list[str]:
    """A comma-separated list of names; which ones an experiment knows is checked once it is chosen."""
    import argparse

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected method names, comma-separated; got {text!r}")
    return names


def _check_methods(name: str, methods: list[str]) -> None:
    from ..experiments import passkey, recall, streameval

    known = {"passkey": passkey.METHODS, "streameval": streameval.METHODS, "recall": recall.METHODS}
    if name not in known:
        raise InputError(f"--methods applies to {' and '.join(known)}, not to {name}")
    unknown = [m for m in methods if m not in known[name]]
    if unknown:
        raise InputError(f"--methods: {name} runs {', '.join(known[name])}; not {', '.join(unknown)}")


def run(args) -> int:
    from tqdm import tqdm

    from ..experiments import Context
    from ..experiments.report import Report

    for path in args.text:
        read_text(path)  # fail now, not after loading the model
    if args.questions is not None and not args.questions.is_file():
        raise InputError(f"questions file not found: {args.questions}")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a folder")
    if args.methods:
        _check_methods(args.name, args.methods)
    memory = memory_config(args)  # settings for the memory methods; refused now if bad, not after loading
    clash = [p for p in Report(args.name, "", "", ()).paths(args.out) if p.exists()]
    if clash and not args.overwrite:
        raise InputError(f"{clash[0]} exists; pass --overwrite to replace it")
    model, tokenizer = load(args)
    ctx = Context(
        model=model,
        tokenizer=tokenizer,
        model_name=args.model,
        command="streamllm " + shlex.join(sys.argv[1:]),
        quick=args.quick,
        texts=args.text,
        tokens=args.tokens,
        questions=args.questions,
        bos=args.bos,
        lengths=args.lengths,
        keys=args.keys,
        methods=args.methods,
        memory=memory,
        bar=lambda total, desc: tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=None),
    )
    start = time.perf_counter()
    report = EXPERIMENTS[args.name](ctx)
    for path in report.write(args.out):
        print(path)
    print(f"[{args.name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
    return 0
