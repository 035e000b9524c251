"""Sessions on disk: one folder per session under ``<state-dir>/sessions/``, written atomically after every turn.

A folder holds ``meta.json`` (format name and version, model and cache settings, counters, digests),
``state-<generation>.safetensors`` (the cache tensors of every layer plus the token log and the conversation
text, with its own counters in its metadata) and ``journal-<generation>.bin``, the turns saved since that state
file as records of what each changed (``journal.py``). ``meta.json`` is the commit point: a new state file is
written under a new name first, or a record appended to the journal, then ``meta.json`` is replaced by a rename.
A crash at any moment leaves the previous turn's state intact; the state file's sha256 in ``meta.json`` and each
record's own sha256 catch a corrupted or truncated file, and a journal tail past the committed length is ignored.

A session with a memory (``--memory``) also has ``memory.bin``, its evicted blocks, only ever appended to: each
save appends the blocks kept since the last one and syncs the file before ``meta.json`` commits its length. A
crash leaves at most an uncommitted tail, which the next load cuts off; the file's id and layout, its length and
each record's checksum are checked when it is read.

Session ids are checked against ``SESSION_ID`` before they become paths, so no request reaches a file outside
the state folder.

Several server processes may share one state folder. A process serves a session only while it holds the
session's lease: an exclusive ``flock`` on the folder's ``lease`` file, taken when the session's cache comes into
memory and given back when it leaves (the operating system gives it back too when the process dies, even by
SIGKILL). Only the holder writes or deletes a session's files, so no turn is forked, lost or half-applied; a
process that wants a session another one holds answers 409, and takes it over from its latest saved turn once
it is free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from array import array
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..config import StreamConfig
from ..core.memory import MemoryFileError
from ..runtime.recompute import Recompute
from ..runtime.stream import Stream
from . import journal
from .journal import JournalError, journal_name

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


# -- a stream <-> tensors ---------------------------------------------------------------------------------------
COUNTERS = ("seen", "offset", "num_sinks", "window", "text_positions", "dtype")  # per layer, in meta.json
LAYER_TENSORS = ("keys", "values", "slot_pos", "key_scales", "value_scales")  # the scales: an 8-bit cache's


def stream_tensors(stream: Stream) -> tuple[dict[str, torch.Tensor], list[dict], dict | None]:
    """The stream's state as named tensors, per-layer counters and the memory's counters (both JSON-able; the
    memory's are None without one). Tensors are copies on CPU. The memory's blocks are not in it: they stay in
    the stream's memory (a rollback) and in its file, up to what the last ``Memory.persist`` wrote."""
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict] = []
    if isinstance(stream.cache, Recompute):  # recompute keeps only its recent tokens (and its windows' BOS)
        tensors |= {f"recompute.{name}": t for name, t in stream.cache.state_dict().items()}
        return tensors, layers, None
    state = stream.cache.state_dict()
    for i, layer in enumerate(state["layers"]):
        layers.append({k: layer[k] for k in COUNTERS})
        if layer["keys"] is not None:
            for name in LAYER_TENSORS:
                if name in layer:  # the scales only where the cache is 8-bit
                    tensors[f"layers.{i}.{name}"] = layer[name].detach().to("cpu", copy=True).contiguous()
    memory = None
    if "memory" in state:
        memory, pending = state["memory"]
        tensors |= {f"memory.{name}": tensor for name, tensor in pending.items()}
    return tensors, layers, memory


def restore_stream(
    stream: Stream,
    tensors: dict[str, torch.Tensor],
    layers: list[dict],
    tokens_seen: int,
    memory: dict | None = None,
) -> None:
    """Put a saved state into ``stream`` (of the same model and configuration): a fresh stream restores its
    memory from its memory file; the stream the state was taken from rolls its memory back to it."""
    kept = stream.memory  # its blocks: what a rollback truncates
    stream.reset()
    if isinstance(stream.cache, Recompute):
        saved = {
            name: tensors[f"recompute.{name}"]
            for name in ("recent", "prefix")
            if f"recompute.{name}" in tensors
        }
        stream.cache.load_state_dict(saved, tokens_seen)
        return
    device = next(stream.model.parameters()).device
    states = []
    for i, counters in enumerate(layers):
        state = dict(counters)
        for name in LAYER_TENSORS:
            tensor = tensors.get(f"layers.{i}.{name}")
            if tensor is not None or name in ("keys", "values", "slot_pos"):
                state[name] = None if tensor is None else tensor.to(device if name != "slot_pos" else "cpu")
        states.append(state)
    state = {"layers": states}
    if (memory is None) != (stream.memory is None):
        raise ValueError("the state and the stream disagree on whether there is a memory")
    if memory is not None:
        stream.cache.memory = kept
        pending = {
            name.removeprefix("memory."): t.to(device)
            for name, t in tensors.items()
            if name.startswith("memory.")
        }
        state["memory"] = (memory, pending)
    stream.cache.load_state_dict(state)
    if stream.tokens_seen != tokens_seen:
        raise ValueError(f"the cache has seen {stream.tokens_seen} tokens, the session {tokens_seen}")


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
    memory's new blocks are appended to its file first (``Memory.persist``; raises ``MemoryFileError``)."""
    text, tokens = log
    if len(text) != convo.text_bytes or hashlib.sha256(text).hexdigest() != convo.sha256:
        raise StateError("the saved conversation and this one differ; the session cannot be saved whole")
    if stream.memory is not None:
        stream.memory.persist()
    tensors, layers, memory = stream_tensors(stream)
    tensors["log.tokens"] = torch.from_numpy(np.frombuffer(tokens.tobytes(), dtype=np.int32).copy())
    tensors["log.text"] = torch.from_numpy(np.frombuffer(bytes(text), dtype=np.uint8).copy())
    own = {
        "layers": layers,
        "memory": memory,
        "tokens_seen": stream.tokens_seen,
    }  # the journal moves meta's on
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
        "layers": layers,
        "memory": memory,
    }
    return meta, save_tensors(tensors, metadata={"state": json.dumps(own)})


def advance_meta(saved: dict, convo: Conversation, stream: Stream, record_header: dict) -> dict:
    """The meta of a save that appends a journal record to the one ``saved`` describes."""
    layers = [dict(old, **new) for old, new in zip(saved["layers"], record_header["layers"], strict=True)]
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
        tokens = array("i", tensors["log.tokens"].to(torch.int32).numpy().tobytes())
        text = bytearray(tensors["log.text"].numpy().tobytes())
        parsed = journal.parse(records)
        memory = own.get("memory")
        if (last := journal.last_memory(parsed)) is not None:  # the memory as the last turn left it
            memory = last[0]
            tensors = {k: t for k, t in tensors.items() if not k.startswith("memory.")} | last[1]
        restore_stream(stream, tensors, own["layers"], int(own["tokens_seen"]), memory)
        journal.replay(parsed, tokens, text, stream)
        if hashlib.sha256(text).hexdigest() != meta["text_sha256"]:
            raise StateError("the conversation text does not match its digest")
        if stream.tokens_seen != meta["tokens_seen"] or len(tokens) != meta["tokens_seen"]:
            raise StateError(
                f"the saved state holds {stream.tokens_seen} tokens, meta.json {meta['tokens_seen']}"
            )
        stream.cache.mark_saved()
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
    if (
        config.memory is not None
    ):  # what shapes a memory file and what it recalls; not where, or the RAM it uses
        m = config.memory
        settings["memory"] = {
            "block_size": m.block_size,
            "blocks": m.blocks,
            "reps": m.reps,
            "refresh": m.refresh,
            "positions": m.positions,
        }
    return settings


def check_meta(meta: object, model_id: str, config: StreamConfig) -> dict:
    """Validate a parsed ``meta.json``; raises ``StateError`` saying what does not fit."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError("meta.json is not a streamllm session")
    if meta.get("version") not in READABLE:
        raise StateError(
            f"saved in format version {meta.get('version')!r}; this server reads versions "
            f"{', '.join(map(str, READABLE))}"
        )
    if meta.get("model") != model_id or meta.get("config") != _config_dict(config):
        raise StateError(
            f"saved by a server with model {meta.get('model')!r} and cache {meta.get('config')}; this server runs "
            f"{model_id!r} with {_config_dict(config)}"
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


class Lease:
    """This process's exclusive hold on one session's files (an ``flock`` on its ``lease`` file)."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the lock
            self.fd = None


class StateDir:
    """The ``sessions/`` folder of ``--state-dir``."""

    def __init__(self, root: Path, model_id: str, config: StreamConfig):
        self.root = (Path(root).expanduser().resolve()) / "sessions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.model_id, self.config = model_id, config

    def folder(self, session_id: str) -> Path:
        if not SESSION_ID.fullmatch(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        return self.root / session_id

    def memory_file(self, session_id: str) -> Path:
        return self.folder(session_id) / MEMORY_FILE

    def lease(self, session_id: str) -> Lease | None:
        """Take the session's lease, or None when another process holds it. Never waits."""
        folder = self.folder(session_id)
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / "lease", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return Lease(fd)

    def ids(self) -> list[str]:
        """Saved sessions: folders with a ``meta.json`` (a session whose first turn never committed has none)."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and SESSION_ID.fullmatch(p.name) and (p / "meta.json").exists()
        )

    def read_meta(self, session_id: str) -> dict:
        path = self.folder(session_id) / "meta.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StateError("meta.json is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateError(f"meta.json is unreadable ({exc})") from None
        meta = check_meta(meta, self.model_id, self.config)
        if meta["id"] != session_id:
            raise StateError("meta.json belongs to another session")
        return meta

    def saved_at(self, session_id: str) -> float:
        """When the session's last turn was committed (unix time)."""
        return (self.folder(session_id) / "meta.json").stat().st_mtime

    def read(self, session_id: str) -> tuple[dict, bytes, bytes]:
        """(meta, state bytes, committed journal bytes), the first two checked (the journal's records are
        checked as they are replayed); raises ``StateError``."""
        meta = self.read_meta(session_id)
        folder = self.folder(session_id)
        try:
            blob = (folder / meta["state_file"]).read_bytes()
        except OSError as exc:
            raise StateError(f"the state file is unreadable ({exc.strerror})") from None
        if hashlib.sha256(blob).hexdigest() != meta["state_sha256"]:
            raise StateError("the state file is corrupted (its sha256 does not match meta.json)")
        record = meta.get("journal") or {"file": "", "bytes": 0}
        try:
            records = journal.read(folder / record["file"], record["bytes"])
        except JournalError as exc:
            raise StateError(str(exc)) from None
        return meta, blob, records

    def read_log(self, session_id: str, meta: dict) -> tuple[bytearray, array]:
        """The whole text and token log of the state ``meta`` describes: the state file's, then the journal's
        additions; raises ``StateError``."""
        folder = self.folder(session_id)
        try:
            with safe_open(folder / meta["state_file"], framework="pt") as f:
                text = bytearray(f.get_tensor("log.text").numpy().tobytes())
                tokens = array("i", f.get_tensor("log.tokens").to(torch.int32).numpy().tobytes())
            record = meta.get("journal") or {"file": "", "bytes": 0}
            for added, fed in journal.logs(journal.read(folder / record["file"], record["bytes"])):
                text.extend(added)
                tokens.extend(fed)
        except (OSError, SafetensorError, JournalError) as exc:
            raise StateError(f"the saved conversation is unreadable ({exc})") from None
        return text, tokens

    def append(self, session_id: str, meta: dict, record: bytes, generation: int) -> dict:
        """Commit a turn as a journal record after the state ``meta`` describes: the record is appended and
        synced, then ``meta.json`` (advanced to it) is replaced by a rename. -> the committed meta"""
        folder = self.folder(session_id)
        at = meta["journal"]
        length = journal.append(folder / at["file"], at["bytes"], record)
        meta = dict(meta, journal={"file": at["file"], "bytes": length}, generation=generation)
        _write_atomic(folder / "meta.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        return meta

    def write(self, session_id: str, meta: dict, blob: bytes, generation: int) -> dict:
        """Commit a whole new state atomically: new state file, then ``meta.json`` by rename (with an empty
        journal after it), then old state files and journals go. -> the committed meta"""
        folder = self.folder(session_id)
        folder.mkdir(exist_ok=True)
        name = f"state-{generation:08d}.safetensors"
        meta = dict(
            meta,
            state_file=name,
            state_sha256=hashlib.sha256(blob).hexdigest(),
            state_bytes=len(blob),
            journal={"file": journal_name(generation), "bytes": 0},
            generation=generation,
        )
        _write_atomic(folder / name, blob)
        _write_atomic(folder / "meta.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        _fsync_dir(folder)
        for old in [*folder.glob("state-*.safetensors"), *folder.glob("journal-*.bin")]:
            if old.name not in (name, meta["journal"]["file"]):
                old.unlink(missing_ok=True)
        return meta

    def delete(self, session_id: str) -> None:
        shutil.rmtree(self.folder(session_id), ignore_errors=True)

    def sweep(self) -> None:
        """Remove temporary files a crash may have left behind, and the memory files of sessions whose first
        turn never committed; only in sessions no other process holds (it may be writing them now)."""
        for folder in self.root.iterdir():
            if not (folder.is_dir() and SESSION_ID.fullmatch(folder.name)):
                continue
            lease = self.lease(folder.name)
            if lease is None:
                continue
            try:
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
                if not (folder / "meta.json").exists():
                    (folder / MEMORY_FILE).unlink(missing_ok=True)
                    (folder / "lease").unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            finally:
                lease.release()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
