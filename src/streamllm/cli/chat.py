"""``streamllm chat``: an endless interactive chat, or a scripted one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..sysinfo import current_rss_mb
from .common import InputError, load, read_text, sampling, sampling_args, stream_args, stream_config


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="endless interactive chat (/reset, /stats, /quit)")
    stream_args(c)
    sampling_args(c, 512)
    c.add_argument("--script", type=Path, help='JSONL file of user turns ({"content": ...} per line)')
    c.add_argument("--transcript", type=Path, help="write every turn as JSONL here")
    c.set_defaults(run=run)


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


def run(args) -> int:
    from ..runtime.chat import ChatSession

    turns = _script_turns(args.script) if args.script else None
    options, config = sampling(args), stream_config(args)
    model, tokenizer = load(args)
    session = ChatSession(model, tokenizer, config, options)
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
