"""What every command shares: the options for a model and a stream, loading, reading input, and the errors a
user can cause (which end in one line on stderr and exit status 2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..backends.arch import UnsupportedModelError
from ..config import (
    DECODE_MODES,
    KV_DTYPES,
    METHODS,
    POSITIONS,
    RECALL_POSITIONS,
    RECALL_SELECT,
    ConfigError,
    MemoryConfig,
    StreamConfig,
)
from ..core.memory import MemoryFileError
from ..data import DataError
from ..defaults import Choice, choose
from ..models import BUILTINS, DEFAULT_MODEL, DTYPES, ModelError, is_pulled, pull


class InputError(ValueError):
    pass


USER_ERRORS = (
    InputError,
    ConfigError,
    ModelError,
    UnsupportedModelError,
    DataError,
    MemoryFileError,
    ValueError,
)


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive, non_negative = int_at_least(1), int_at_least(0)


def model_args(p: argparse.ArgumentParser, dtype: str = "auto") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, HF folder, .gguf file or hub id")
    p.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default=dtype,
        help=f"weights and activations (default {dtype}; auto: bfloat16 where this CPU has it natively)",
    )
    p.add_argument(
        "--exact", action="store_true", help="float32 and the exact fast path: the reference for comparisons"
    )
    p.add_argument("--threads", type=positive, default=None, help="torch CPU threads")


def stream_args(p: argparse.ArgumentParser, memory: bool = False) -> None:
    """The options that shape a stream; ``memory``: memory is on unless ``--no-memory`` (``chat`` and ``serve``,
    where it measured no worse than plain sink; see ``docs/results.md``, "Default")."""
    model_args(p)
    p.add_argument("--num-sinks", type=non_negative, default=4)
    p.add_argument("--window", type=positive, default=1020)
    p.add_argument("--method", choices=METHODS, default="sink")
    p.add_argument("--chunk-size", type=positive, default=512, help="tokens per forward pass for long inputs")
    p.add_argument(
        "--positions",
        choices=POSITIONS,
        default="cache",
        help="sinks seen at in-cache positions (the paper) or at text positions",
    )
    p.add_argument(
        "--decode",
        choices=["auto", *DECODE_MODES],
        default="auto",
        help="single tokens: fast path (exact), fast path on 4-bit weights, or transformers' forward (default "
        "auto: int4 where the published weights are 4-bit and it measured faster, else fast)",
    )
    p.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        default="model",
        help="cached keys and values: as the model computes them (default), or 8-bit with a scale per token and "
        "head (a quarter of float32's bytes, half of bfloat16's; perplexity about +0.5%%)",
    )
    p.add_argument(
        "--no-bos",
        dest="bos",
        action="store_false",
        help="do not start the stream with BOS (by default it does when the tokenizer adds one)",
    )
    memory_args(p, memory)


MEMORY_FLAGS = {  # option -> MemoryConfig field
    "--memory-block": "block_size",
    "--memory-blocks": "blocks",
    "--memory-reps": "reps",
    "--memory-refresh": "refresh",
    "--memory-ram": "ram_mb",
    "--memory-neighbours": "neighbours",
}


def memory_args(p: argparse.ArgumentParser, default: bool = False) -> None:
    d = MemoryConfig()
    if default:
        g = p.add_argument_group(
            "memory of evicted tokens (on by default with --method sink; --no-memory: off)"
        )
        g.add_argument(
            "--memory", action="store_true", help="keep evicted tokens and recall them (the default)"
        )
        g.add_argument(
            "--no-memory", action="store_true", help="plain sink cache: evicted tokens are gone for good"
        )
        p.set_defaults(memory_by_default=True)
    else:
        g = p.add_argument_group("memory of evicted tokens (any --memory-* option turns it on)")
        g.add_argument(
            "--memory", action="store_true", help="keep evicted tokens in blocks and recall the relevant ones"
        )
    helps = {
        "block_size": f"tokens per block (default {d.block_size})",
        "blocks": f"blocks recalled at a time (default {d.blocks})",
        "reps": f"representative keys per block and kv head (default {d.reps})",
        "refresh": f"tokens between selections (default {d.refresh})",
        "ram_mb": f"MiB of blocks kept in RAM; older blocks go to a file (default {d.ram_mb})",
        "neighbours": f"blocks after each chosen one recalled with it (default {d.neighbours})",
    }
    for flag, field in MEMORY_FLAGS.items():
        g.add_argument(flag, dest=f"memory_{field}", type=int, default=None, help=helps[field])
    g.add_argument(
        "--memory-positions",
        choices=RECALL_POSITIONS,
        default=None,
        help="recalled tokens between the sinks and the window (cache, default) or all just past it (fixed)",
    )
    g.add_argument(
        "--memory-select",
        choices=RECALL_SELECT,
        default=None,
        help=f"choose blocks by attention, by the tokens they share with the prompt (content), or content "
        f"proposing and attention choosing (hybrid) (default {d.select})",
    )
    g.add_argument("--memory-dir", type=Path, default=None, help="folder for the memory file (default: temp)")


def sampling_args(p: argparse.ArgumentParser, max_new: int, chat: bool = False) -> None:
    """The sampling options. With ``chat``, the ones left unset take the chat defaults (see ``chat_sampling``)."""

    def default(value):
        return None if chat else value

    note = " (default: the model's own, else the chat default)" if chat else ""
    p.add_argument("--max-new-tokens", type=positive, default=max_new)
    p.add_argument("--temperature", type=float, default=default(0.0), help="0 is greedy" + note)
    p.add_argument("--top-p", type=float, default=default(1.0), help=note.strip() or None)
    p.add_argument("--top-k", type=non_negative, default=default(0), help="0 is off" + note)
    p.add_argument("--repetition-penalty", type=float, default=default(1.0), help=note.strip() or None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def memory_config(args) -> MemoryConfig | None:
    """The ``MemoryConfig`` the options ask for: None when no memory option is given, unless the command has
    memory on by default (``stream_args(memory=True)``) and the cache can use it."""
    fields = {f: getattr(args, f"memory_{f}", None) for f in MEMORY_FLAGS.values()}
    fields["positions"] = getattr(args, "memory_positions", None)
    fields["select"] = getattr(args, "memory_select", None)
    fields["dir"] = getattr(args, "memory_dir", None)
    given = {k: v for k, v in fields.items() if v is not None}
    if getattr(args, "no_memory", False):
        if given:
            flag = {v: k for k, v in MEMORY_FLAGS.items()}.get(name := next(iter(given)), f"--memory-{name}")
            raise InputError(f"--no-memory turns memory off; leave out {flag}")
        return None
    # On by default only where it applies: the other methods keep no sinks to recall between, or evict nothing.
    default = (
        getattr(args, "memory_by_default", False) and args.method == "sink" and args.positions == "cache"
    )
    if not given and not getattr(args, "memory", False) and not default:
        return None
    if "dir" in given and not given["dir"].is_dir():
        raise InputError(f"memory folder does not exist: {given['dir']}")
    return MemoryConfig(**given)


def path_choice(args) -> Choice:
    """The dtype and decode path the options ask for, "auto" resolved for this model and CPU (``defaults.py``);
    worked out once per command."""
    if getattr(args, "choice", None) is None:
        decode = getattr(args, "decode", "auto")
        if args.exact and (args.dtype not in ("auto", "float32") or decode not in ("auto", "fast")):
            raise InputError("--exact means float32 and the fast path; leave out --dtype and --decode")
        args.choice = choose(args.model, args.dtype, decode, args.exact)
    return args.choice


def stream_config(args) -> StreamConfig:
    return StreamConfig(
        num_sinks=args.num_sinks,
        window=args.window,
        method=args.method,
        chunk_size=args.chunk_size,
        positions=args.positions,
        decode=path_choice(args).decode,
        kv_dtype=getattr(args, "kv_dtype", "model"),
        memory=memory_config(args),
    )


def path_info(stream, choice: Choice) -> dict:
    """What produced a figure: the dtype, the decode path the stream really takes, and why they were chosen, and
    the dtype of its cached keys and values."""
    return {
        "dtype": choice.dtype,
        "decode": stream.decode_path,
        "why": choice.why,
        "kv_dtype": stream.config.kv_dtype,
    }


def path_line(stream, choice: Choice) -> str:
    """``path_info`` for a one-line summary."""
    kv = ", 8-bit cache" if stream.config.kv_dtype == "int8" else ""
    return f"{choice.dtype}, {stream.decode_path} decode{kv} ({choice.why})"


def memory_stats(stream) -> dict | None:
    """What a stream's memory holds (``Memory.stats``), or None without one."""
    memory = getattr(stream, "memory", None)
    return None if memory is None else memory.stats()


def memory_line(stream) -> str:
    """The memory's vital signs for a one-line summary ("" without a memory)."""
    m = memory_stats(stream)
    if m is None:
        return ""
    return (
        f", memory {m['blocks']} blocks ({m['tokens']} tokens, {m['ram_bytes'] / 2**20:.0f} MB RAM, "
        f"{m['disk_bytes'] / 2**20:.0f} MB disk, {m['recalled']} recalled)"
    )


def load(args):
    import torch

    from ..models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if not sys.stderr.isatty():  # a log or a pipe gets no progress bars from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.model in BUILTINS and not is_pulled(args.model):
        pull(args.model, progress=say)
    return load_model(args.model, path_choice(args).dtype)


def say(message: str) -> None:
    """A line of progress for the person at the terminal."""
    print(f"[streamllm] {message}", file=sys.stderr)


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


def sampling(args, base=None):
    """The ``Sampling`` the options ask for: the options given on the command line over ``base`` (default:
    ``Sampling()``); a chat's options left unset are None and keep ``base``'s. Raises ``ConfigError`` for a value
    out of range."""
    from dataclasses import replace

    from ..runtime.generate import Sampling

    names = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_new_tokens", "ignore_eos")
    given = {name: getattr(args, name) for name in names} | {"stop": tuple(args.stop)}
    return replace(base or Sampling(), **{k: v for k, v in given.items() if v is not None})


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
