"""Sessions on disk: one folder per session under ``<state-dir>/sessions/``, written atomically after every turn.

A folder holds ``meta.json`` (format name and version, model and cache settings, counters, digests),
``state-<generation>.safetensors`` (the cache tensors of every layer plus the token log and the conversation
text, with its own counters in its metadata) and ``journal-<generation>.bin``, the turns saved since that state
file as records of what each changed (``journal.py``). ``meta.json`` is the commit point: a new state file is
written under a new name first, or a record appended to the journal, then ``meta.json`` is replaced by a rename.
A crash at any moment leaves the previous turn's state intact; the state file's sha256 in ``meta.json`` and each
record's own sha256 catch a corrupted or truncated file, and a journal tail past the committed length is ignored.

A session with a memory (on by default) also has ``memory.bin``, its evicted blocks, only ever appended to: each
save appends the blocks kept since the last one and syncs the file before ``meta.json`` commits its length. A
crash leaves at most an uncommitted tail, which the next load ignores and the next save writes over; the file's
id and layout, its length and each record's checksum are checked when it is read.

Session ids are checked against ``SESSION_ID`` before they become paths, so no request reaches a file outside
the state folder.

Reading and committing a folder, and the lease that lets one process at a time serve it: ``statedir.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from array import array

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..config import StreamConfig
from ..runtime.state import MemoryFileError
from ..runtime.stream import Stream
from . import journal
from .journal import JournalError, log_of, log_tensors

log = logging.getLogger(__name__)

FORMAT = "streamllm-session"
VERSION = 2  # 2: a journal of turns after the state file (``journal.py``)
READABLE = (1, 2)
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
MEMORY_FILE = "memory.bin"


class StateError(Exception):
    """A saved session that cannot be used (corrupted, written by another format version, another model...)."""


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 32 characters, 192 random bits


class Conversation:
    """What a session has said so far, as much of it as matching a resent history and saving need: the length
    and the running sha256 of the rendered text the cache has seen (not the text), the count of tokens fed, the
    template text that ends the last reply (not fed yet), and the text and tokens not on disk yet. The whole text
    and token log live on disk (``--state-dir``) or nowhere."""

    def __init__(self, close: str = "", turns: int = 0):
        self.close, self.turns = close, turns
        self.text_bytes = self.token_count = 0
        self._digest = hashlib.sha256()
        self.unsaved_text, self.unsaved_tokens = bytearray(), array("i")

    @classmethod
    def of(cls, text: bytes, tokens, close: str = "", turns: int = 0) -> Conversation:
        convo = cls(close, turns)
        convo.extend(text, tokens)
        return convo

    def extend(self, text: bytes, tokens) -> None:
        """The conversation goes on by ``text`` (UTF-8) and ``tokens``."""
        self._digest.update(text)
        self.text_bytes += len(text)
        self.token_count += len(tokens)
        self.unsaved_text += text
        self.unsaved_tokens.extend(tokens)

    def saved(self) -> None:
        """Everything said so far is on disk (or will never be: a server without ``--state-dir``)."""
        self.unsaved_text, self.unsaved_tokens = bytearray(), array("i")

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def continued_by(self, prompt: str) -> str | None:
        """What ``prompt`` adds when it starts with this conversation's text and goes on, else None."""
        encoded = prompt.encode("utf-8")
        if len(encoded) <= self.text_bytes:
            return None
        if hashlib.sha256(encoded[: self.text_bytes]).hexdigest() != self.sha256:
            return None
        try:
            return encoded[self.text_bytes :].decode("utf-8")
        except UnicodeDecodeError:  # not on a character boundary: it cannot be this text's continuation
            return None

    def copy(self) -> Conversation:
        other = Conversation(self.close, self.turns)
        other.text_bytes, other.token_count, other._digest = (
            self.text_bytes,
            self.token_count,
            self._digest.copy(),
        )
        other.unsaved_text, other.unsaved_tokens = (
            bytearray(self.unsaved_text),
            array("i", self.unsaved_tokens),
        )
        return other


# per layer, the counters of a stream's state that meta.json repeats (``runtime/state.py``)
COUNTERS = ("seen", "offset", "num_sinks", "window", "text_positions", "dtype")


def encode_state(
    session_id: str,
    owner: str,
    model_id: str,
    config: StreamConfig,
    convo: Conversation,
    stream: Stream,
    log: tuple[bytes, array],
) -> tuple[dict, bytes]:
    """(meta, safetensors bytes) of a session whose whole text and token log are ``log`` (the saved ones and the
    conversation's unsaved ones: ``StateDir.read_log``); meta still lacks the state file's name and digest. A
    memory's new blocks are appended to its file first (``Stream.persist``; raises ``MemoryFileError``)."""
    text, tokens = log
    if len(text) != convo.text_bytes or hashlib.sha256(text).hexdigest() != convo.sha256:
        raise StateError("the saved conversation and this one differ; the session cannot be saved whole")
    stream.persist()
    tensors, own = stream.state()  # the journal moves meta's counters on, not these
    tensors |= log_tensors(text, tokens)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "id": session_id,
        "owner": owner,
        "model": model_id,
        "config": _config_dict(config),
        "turns": convo.turns,
        "tokens_seen": stream.tokens_seen,
        "close": convo.close,
        "text_bytes": convo.text_bytes,
        "text_sha256": convo.sha256,
        "layers": own["layers"],
        "memory": own["memory"],
    }
    return meta, save_tensors(tensors, metadata={"state": json.dumps(own)})


def advance_meta(saved: dict, convo: Conversation, stream: Stream, record_header: dict) -> dict:
    """The meta of a save that appends a journal record to the one ``saved`` describes."""
    layers = [
        old | {k: v for k, v in new.items() if k in COUNTERS}  # not the record's own ``positions_of``
        for old, new in zip(saved["layers"], record_header["layers"], strict=True)
    ]
    return dict(
        saved,
        turns=convo.turns,
        tokens_seen=stream.tokens_seen,
        close=convo.close,
        text_bytes=convo.text_bytes,
        text_sha256=convo.sha256,
        layers=layers,
        memory=record_header["memory"],
    )


def decode_state(meta: dict, blob: bytes, stream: Stream, records: bytes = b"") -> Conversation:
    """Restore ``stream`` from a saved state and the journal ``records`` after it, and return the conversation;
    raises ``StateError``."""
    try:
        tensors = load_tensors(blob)
        own = json.loads(journal.metadata(blob).get("state", "null")) or meta  # version 1: meta's counters
    except (SafetensorError, ValueError) as exc:
        raise StateError(f"the state file is not valid safetensors ({exc})") from None
    try:
        text, tokens = log_of(tensors)
        parsed = journal.parse(records)
        journal.extend_log(parsed, text, tokens)
        stream.load((tensors, own), [(changed, header) for header, changed in parsed])
        if hashlib.sha256(text).hexdigest() != meta["text_sha256"]:
            raise StateError("the conversation text does not match its digest")
        if stream.tokens_seen != meta["tokens_seen"] or len(tokens) != meta["tokens_seen"]:
            raise StateError(
                f"the saved state holds {stream.tokens_seen} tokens, meta.json {meta['tokens_seen']}"
            )
        stream.mark_saved()
    except JournalError as exc:
        stream.reset()
        raise StateError(str(exc)) from None
    except StateError:
        stream.reset()
        raise
    except MemoryFileError as exc:
        stream.reset()
        raise StateError(str(exc)) from None
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        stream.reset()
        raise StateError(f"the state file does not fit this model ({type(exc).__name__}: {exc})") from None
    convo = Conversation.of(bytes(text), tokens, meta["close"], int(meta["turns"]))
    convo.saved()
    return convo


def _config_dict(config: StreamConfig) -> dict:
    settings = {
        "num_sinks": config.num_sinks,
        "window": config.window,
        "method": config.method,
        "positions": config.positions,
        "rebase_every": config.rebase_every,
    }
    # what shapes a memory file and what it recalls; not where, or the RAM it uses
    if config.memory is not None:
        m = config.memory
        settings["memory"] = {
            "block_size": m.block_size,
            "blocks": m.blocks,
            "reps": m.reps,
            "refresh": m.refresh,
            "positions": m.positions,
        }
    return settings


def _without_memory(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "memory"}


def check_meta(meta: object, model_id: str, config: StreamConfig) -> dict:
    """Validate a parsed ``meta.json``; raises ``StateError`` saying what does not fit."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError("meta.json is not a streamllm session")
    if meta.get("version") not in READABLE:
        raise StateError(
            f"saved in format version {meta.get('version')!r}; this server reads versions "
            f"{', '.join(map(str, READABLE))}"
        )
    saved, ours = meta.get("config"), _config_dict(config)
    same_model = meta.get("model") == model_id
    if (
        same_model
        and isinstance(saved, dict)
        and saved != ours
        and _without_memory(saved) == _without_memory(ours)
    ):
        if "memory" in saved:
            raise StateError(
                f"saved by a server with memory {saved['memory']}; start this one with those --memory-* settings "
                "to continue it"
            )
        raise StateError("saved by a server without memory; start this one with --no-memory to continue it")
    if not same_model or saved != ours:
        raise StateError(
            f"saved by a server with model {meta.get('model')!r} and cache {meta.get('config')}; this server runs "
            f"{model_id!r} with {ours}"
        )
    wanted = {"id": str, "owner": str, "turns": int, "tokens_seen": int, "close": str, "text_bytes": int}
    wanted |= {"text_sha256": str, "layers": list, "state_file": str, "state_sha256": str, "generation": int}
    for key, kind in wanted.items():
        if not isinstance(meta.get(key), kind):
            raise StateError(f"meta.json lacks a valid {key!r}")
    if not isinstance(meta.get("memory"), dict | None):
        raise StateError("meta.json lacks a valid 'memory'")
    if not re.fullmatch(r"state-\d{8}\.safetensors", meta["state_file"]):
        raise StateError("meta.json names an unexpected state file")
    record = meta.get("journal")
    if record is not None and not (
        isinstance(record, dict)
        and isinstance(record.get("file"), str)
        and re.fullmatch(r"journal-\d{8}\.bin", record["file"])
        and isinstance(record.get("bytes"), int)
        and record["bytes"] >= 0
    ):
        raise StateError("meta.json lacks a valid 'journal'")
    return meta
