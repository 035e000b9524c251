"""The ``streamllm`` command: one module per command, each with ``add_parser`` and ``run``. Errors a user can
cause end in one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import sys

from . import chat, demo, experiment, generate, models, perplexity, pretrain, serve, serve_ray
from .common import USER_ERRORS, Parser

COMMANDS = (generate, chat, perplexity, models, experiment, pretrain, demo, serve, serve_ray)


def build_parser() -> Parser:
    parser = Parser(prog="streamllm", description="Endless LLM streams with attention sinks.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="[%(name)s] %(message)s"
    )
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"streamllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstreamllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
