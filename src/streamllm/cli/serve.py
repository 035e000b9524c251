"""``streamllm serve``: the OpenAI-compatible chat server's command-line options and start-up."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from ..config import HISTORY, ConfigError
from .common import (
    InputError,
    int_at_least,
    path_choice,
    positive,
    read_text,
    say,
    stream_args,
    stream_config,
)


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible chat server with endless, persistent sessions")
    server_args(s)
    s.set_defaults(run=run)


def server_args(s) -> None:
    """The options of ``serve``, which ``serve-ray`` shares (each replica is built from them)."""
    stream_args(s, memory=True)
    # Smaller prompt chunks than the other commands: one chunk is what other sessions wait for at most.
    s.set_defaults(chunk_size=128)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=port_number, default=8000)
    s.add_argument(
        "--api-key", action="append", default=[], help="require 'Authorization: Bearer KEY' (repeatable)"
    )
    s.add_argument("--api-key-file", type=Path, help="file with one API key per line")
    s.add_argument(
        "--state-dir", type=Path, help="keep sessions here: saved after every turn, kept across restarts"
    )
    s.add_argument(
        "--store",
        metavar="URL",
        help="keep sessions in Redis or Valkey (redis://HOST:PORT/DB), shared by any number of server processes; "
        "the password comes from --store-password-file or STREAMLLM_STORE_PASSWORD, never the URL",
    )
    s.add_argument("--store-password-file", type=Path, help="file whose first line is the store's password")
    s.add_argument(
        "--lease-wait",
        type=float,
        default=30.0,
        help="seconds a turn waits while another process runs a turn of the same session, then 409 (default 30)",
    )
    s.add_argument(
        "--lease-ttl",
        type=float,
        default=15.0,
        help="with --store: seconds a session stays blocked after a process dies mid-turn (default 15)",
    )
    s.add_argument(
        "--max-sessions",
        type=positive,
        default=16,
        help=f"sessions whose cache stays in memory (LRU); unless --memory-ram says otherwise, each session's "
        f"memory keeps {SERVER_MEMORY_RAM_MB} MiB / this many (at least 64) of blocks in RAM, the rest in its file",
    )
    s.add_argument("--max-body-bytes", type=positive, default=8 * 2**20, help="largest request body")
    s.add_argument(
        "--max-tokens",
        type=positive,
        default=4096,
        help="largest max_tokens a request may ask for (and the default)",
    )
    s.add_argument("--max-message-chars", type=positive, default=1_000_000, help="longest single message")
    s.add_argument("--request-timeout", type=positive, default=600, help="seconds a request may take in all")
    s.add_argument(
        "--batch-decode",
        type=positive,
        default=16,
        help="let up to N sessions share each decode forward pass (default 16: faster under load, same results "
        "as measured; 1: replies never depend on other traffic, even in rare near-ties)",
    )
    s.add_argument(
        "--history",
        choices=HISTORY,
        default="window",
        help="a resent conversation that matches no session and is longer than the cache: feed its first --num-sinks "
        "and last --window tokens (window, the default: bounded time), or all of it (exact)",
    )
    s.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics (Prometheus) without an API key; by default it needs one, like every other route",
    )
    s.add_argument(
        "--log-format",
        choices=("text", "json"),  # ``server.logs.FORMATS``, not imported: building the parser stays light
        default="text",
        help="text lines, or one JSON object per line for log shippers (json); either way one line per request",
    )


# MiB of memory blocks in RAM for all resident sessions together, by default: a server holds --max-sessions memories
# where a chat holds one, so each gets its share (``MemoryConfig.ram_mb`` is per memory).
SERVER_MEMORY_RAM_MB = 1024


def port_number(text: str) -> int:
    port = int_at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535, got {port}")
    return port


def _api_keys(args) -> tuple[str, ...]:
    keys = list(args.api_key)
    if args.api_key_file:
        keys += [line.strip() for line in read_text(args.api_key_file).splitlines() if line.strip()]
    if any(not key.strip() for key in keys):
        raise InputError("an API key must not be empty")
    return tuple(key.strip() for key in keys)


def _store_password(args) -> str | None:
    from ..server.config import store_password

    if args.store_password_file is not None:
        read_text(args.store_password_file)  # a missing or empty file: the message every command gives
    try:
        return store_password(args.store_password_file)
    except ConfigError as exc:
        raise InputError(str(exc)) from None


def _check_store(config) -> None:
    """Fail at start-up, in one line, when the store cannot be reached or refuses the password."""
    from ..server.redis_store import RedisStore
    from ..server.store import StoreUnavailable

    try:
        store = RedisStore(config.store, config.store_password, config.model_id, config.stream)
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    except ImportError:
        raise InputError("--store needs the redis package: pip install 'streamllm[redis]'") from None
    try:
        store.ping()
    except StoreUnavailable as exc:
        raise InputError(exc.message.split(";")[0]) from None
    finally:
        store.close()


def run(args) -> int:
    from ..server import serve
    from ..server.app import load_server
    from ..server.logs import configure

    configure(args.log_format)
    config = server_config(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_keys:
        logging.getLogger("streamllm.server").warning(
            "listening on %s without --api-key: anyone who can reach it can use it", args.host
        )
    model, tokenizer, config = load_server(model_choice(args), config, progress=say)
    level = "debug" if args.verbose else "info"
    serve(model, tokenizer, config, args.host, args.port, log_level=level, log_format=args.log_format)
    return 0


def model_choice(args):
    """The ``ModelChoice`` the options give ("auto" resolved for this model and CPU)."""
    from ..server.config import ModelChoice

    choice = path_choice(args)
    return ModelChoice(args.model, choice.dtype, choice.decode, choice.why, args.threads)


def server_config(args):
    """The ``ServerConfig`` the options give, the state folder made and the store reached; raises
    ``InputError``."""
    from ..server import ServerConfig

    if args.store is not None and args.state_dir is not None:
        raise InputError("give --state-dir or --store, not both")
    if not args.lease_wait >= 0:
        raise InputError(f"--lease-wait must be >= 0, got {args.lease_wait}")
    if not args.lease_ttl >= 1:
        raise InputError(f"--lease-ttl must be >= 1, got {args.lease_ttl}")
    stream = stream_config(args)
    if stream.memory is not None and args.memory_ram_mb is None:
        share = max(
            64, SERVER_MEMORY_RAM_MB // args.max_sessions
        )  # a floor: one block of a 7B model is 16 MiB
        stream = replace(stream, memory=replace(stream.memory, ram_mb=share))
    config = ServerConfig(
        model_id=args.model,
        stream=stream,
        api_keys=_api_keys(args),
        state_dir=args.state_dir,
        store=args.store,
        store_password=_store_password(args) if args.store is not None else None,
        lease_wait_s=args.lease_wait,
        lease_ttl_s=args.lease_ttl,
        max_sessions=args.max_sessions,
        max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens,
        max_message_chars=args.max_message_chars,
        request_timeout_s=float(args.request_timeout),
        batch_decode=args.batch_decode,
        bos=args.bos,
        history=args.history,
        metrics_public=args.metrics_public,
    )
    if args.state_dir is not None:
        try:
            args.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot use --state-dir {args.state_dir}: {exc.strerror}") from None
    if config.store is not None:
        _check_store(config)
    return config
