"""``streamllm chat``: an endless interactive chat, or a scripted one.

At the prompt: line editing and history (readline), ``\"\"\"`` opens and closes a multi-line message, a line
ending in ``\\`` goes on on the next one. Ctrl-C stops a reply and keeps the turn as far as it went; on a line
being typed it drops the line; at an empty prompt, a second Ctrl-C in a row ends the chat, as do Ctrl-D and
``/quit``.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..home import home
from ..sysinfo import current_rss_mb
from .common import (
    InputError,
    load,
    memory_line,
    path_choice,
    path_line,
    read_text,
    sampling,
    sampling_args,
    stream_args,
    stream_config,
)

if TYPE_CHECKING:
    from ..runtime.generate import Event

HELP = """Commands:
  /help    this list
  /stats   turns, tokens streamed, cache fill, sampling, memory (and what the last reply recalled from it)
  /reset   start a new conversation (empties the cache)
  /quit    leave (also Ctrl-D, or Ctrl-C twice at an empty prompt)
Ctrl-C while the model answers stops the reply; the conversation keeps what it said so far.
Multi-line messages: a line of three double quotes (\"\"\") opens them and another closes them, or end a line
with \\ to go on on the next one."""

HISTORY_LINES = 1000


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="endless interactive chat (/help lists the commands)")
    stream_args(c, memory=True)
    sampling_args(c, 512, chat=True)
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


class Prompt:
    """Reads one message at a time from the terminal. ``read`` returns None when the user leaves."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.history: Path | None = None
        self.interrupted = False  # the last thing at the prompt was a Ctrl-C
        if interactive:
            self._start_readline()

    def _start_readline(self) -> None:
        try:
            import readline  # noqa: F401  (line editing for input() from here on)
        except ImportError:
            return
        self.history = home() / "chat_history"
        try:
            readline.read_history_file(self.history)
        except OSError:
            pass  # no history yet
        readline.set_history_length(HISTORY_LINES)

    def save_history(self) -> None:
        if self.history is None:
            return
        import readline

        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(self.history)
        except OSError:
            pass  # a read-only home loses the history, not the chat

    def read(self) -> str | None:
        while True:
            try:
                message = self._message()
            except EOFError:
                print()
                return None
            except KeyboardInterrupt:
                if self._typed():  # Ctrl-C on a line being typed drops that line
                    print()
                    self.interrupted = False
                    continue
                if self.interrupted:
                    print()
                    return None
                self.interrupted = True
                print("\n(Ctrl-C again, Ctrl-D or /quit to leave)")
                continue
            self.interrupted = False
            return message

    def _typed(self) -> bool:
        if self.history is None:
            return False
        import readline

        return bool(readline.get_line_buffer().strip())

    def _message(self) -> str:
        first = input("> ")
        if first.strip() == '"""':
            lines = []
            while (line := input("... ")).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        lines = [first]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("... "))
        return "\n".join(lines)


class StopOnInterrupt:
    """While a reply streams, Ctrl-C asks it to stop after the current token instead of killing the program (a
    forward pass cut in half would leave the cache half written)."""

    def __enter__(self) -> StopOnInterrupt:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _stats(session, config, choice) -> str:
    s = session.sampling
    shape = (
        "greedy" if s.temperature == 0 else f"temperature {s.temperature}, top-p {s.top_p}, top-k {s.top_k}"
    )
    return (
        f"[turns {session.turns}, streamed {session.stream.tokens_seen} tokens, cache "
        f"{session.stream.cache_length}/{config.cache_size}, sampling {shape}, repetition penalty "
        f"{s.repetition_penalty}, RSS {current_rss_mb():.0f} MB, {path_line(session.stream, choice)}"
        f"{memory_line(session.stream)}]"
    )


def _recall_lines(session) -> list[str]:
    """What the last reply's prompt recalled from memory, one block a line ([] without a memory)."""
    recalls = session.last_recalls
    if session.stream.memory is None:
        return []
    if recalls is None:
        return ["[memory: no reply yet]"]
    if not recalls:
        return ["[memory: the last reply recalled nothing]"]
    lines = [f"[memory: the last reply recalled {len(recalls)} block{'s' if len(recalls) > 1 else ''}]"]
    for r in recalls:
        text = f'"{r.text}"' if r.text else "(its text was not kept)"
        lines.append(f"  said {r.tokens_ago:,} tokens ago, chosen by {r.layers:.0%} of memory layers: {text}")
    return lines


def _reply(session, user: str) -> tuple[str, Event | None, bool]:
    """Stream one reply to the terminal: (its text, the last event, whether the user stopped it)."""
    reply, last = [], None
    events = session.send(user)
    with StopOnInterrupt() as stop:
        try:
            for event in events:
                sys.stdout.write(event.text)
                sys.stdout.flush()
                reply.append(event.text)
                last = event
                if stop.requested:
                    break
        finally:
            events.close()
    sys.stdout.write(" [stopped]\n" if stop.requested else "\n")
    return "".join(reply), last, stop.requested


def run(args) -> int:
    from ..runtime.chat import CHAT_SAMPLING, ChatSession, chat_sampling

    turns = _script_turns(args.script) if args.script else None
    sampling(args, CHAT_SAMPLING)  # a bad value fails now, not after loading the model
    config = stream_config(args)
    model, tokenizer = load(args)
    session = ChatSession(model, tokenizer, config, sampling(args, chat_sampling(model)), bos=args.bos)
    transcript = open(args.transcript, "a", encoding="utf-8") if args.transcript else None  # noqa: SIM115
    source = iter(turns) if turns is not None else None
    prompt = None if source is not None else Prompt(sys.stdin.isatty())
    if prompt is not None and prompt.interactive:
        print("streamllm chat: /help lists the commands, Ctrl-C stops a reply.")
    try:
        while True:
            if source is not None:
                user = next(source, None)
                if user is not None:
                    print(f"> {user}")
            else:
                user = prompt.read() if prompt is not None else None
            if user is None:
                break
            command = user.strip()
            if command == "/quit":
                break
            if command in ("/help", "/?"):
                print(HELP)
                continue
            if command == "/reset":
                session.reset()
                print("[conversation reset]")
                continue
            if command == "/stats":
                print("\n".join([_stats(session, config, path_choice(args)), *_recall_lines(session)]))
                continue
            if command.startswith("/") and " " not in command:
                print(f"unknown command {command}; /help lists them")
                continue
            if not command:
                continue
            reply, last, stopped = _reply(session, user)
            if transcript and last is not None:
                row = {
                    "user": user,
                    "assistant": reply,
                    "stopped": stopped,
                    "tokens_seen": last.tokens_seen,
                    "cache_length": last.cache_length,
                    "tok_per_s": round(last.tok_per_s, 2),
                }
                transcript.write(json.dumps(row) + "\n")
                transcript.flush()
    finally:
        if transcript:
            transcript.close()
        if prompt is not None:
            prompt.save_history()
    return 0
