"""``streamllm models``: list the built-in models, or pull one."""

from __future__ import annotations

import sys

from ..models import BUILTINS, DEFAULT_MODEL, is_pulled, model_dir, pull
from .common import InputError


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list built-in models, or pull one")
    m.add_argument("action", nargs="?", choices=["list", "pull"], default="list")
    m.add_argument("name", nargs="?")
    m.set_defaults(run=run)


def run(args) -> int:
    if args.action == "pull":
        if not args.name:
            raise InputError("which model? usage: streamllm models pull NAME")
        path = pull(args.name, progress=lambda msg: print(f"[streamllm] {msg}", file=sys.stderr))
        print(path)
        return 0
    for name, m in BUILTINS.items():
        state = f"pulled: {model_dir(name)}" if is_pulled(name) else "not pulled"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}\t{m.description}\t{m.size}\tlicense: {m.license}\t[{state}]")
    return 0
