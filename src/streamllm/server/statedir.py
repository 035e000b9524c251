"""A session's folder under ``<state-dir>/sessions/``: reading and committing its state, and the lease that lets
one process at a time serve it (the formats and their checks are ``persist.py``'s and ``journal.py``'s).

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
import os
import secrets
import shutil
from array import array
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import StreamConfig
from . import journal
from .journal import JournalError, journal_name
from .persist import MEMORY_FILE, SESSION_ID, StateError, check_meta


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
