"""The local store (``--state-dir``): a folder per session under ``<state-dir>/sessions/``, read and committed
here (the formats and their checks are ``persist.py``'s and ``journal.py``'s; the contract is ``store.Store``'s).

Several server processes on one machine may share the folder. A session's lease is an exclusive ``flock`` on its
folder's ``lease`` file, held for the length of a turn (the operating system gives it back when the process dies,
even by SIGKILL). Only the holder writes or deletes a session's files.
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

from safetensors import SafetensorError, safe_open

from ..config import StreamConfig
from . import journal
from .journal import JournalError, journal_name
from .persist import MEMORY_FILE, SESSION_ID, StateError, check_meta
from .store import Lease, LeaseLost, Store


class FileLease(Lease):
    """This process's exclusive hold on one session's files (an ``flock`` on its ``lease`` file)."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the lock
            self.fd = None


class StateDir(Store):
    """The ``sessions/`` folder of ``--state-dir``."""

    def __init__(self, root: Path, model_id: str, config: StreamConfig):
        self.root = (Path(root).expanduser().resolve()) / "sessions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.model_id, self.config = model_id, config
        self.where = str(Path(root).expanduser().resolve())

    def folder(self, session_id: str) -> Path:
        if not SESSION_ID.fullmatch(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        return self.root / session_id

    def memory_file(self, session_id: str) -> Path:
        return self.folder(session_id) / MEMORY_FILE

    def lease(self, session_id: str) -> FileLease | None:
        folder = self.folder(session_id)
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / "lease", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return FileLease(fd)

    def ids(self) -> list[str]:
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

    def generation(self, session_id: str) -> int:
        try:
            meta = json.loads((self.folder(session_id) / "meta.json").read_text(encoding="utf-8"))
            return int(meta["generation"])
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"meta.json is unreadable ({exc})") from None

    def saved_at(self, session_id: str) -> float:
        return (self.folder(session_id) / "meta.json").stat().st_mtime

    def read(self, session_id: str) -> tuple[dict, bytes, bytes]:
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
        """The state file's text and tokens, then the journal's additions."""
        folder = self.folder(session_id)
        try:
            with safe_open(folder / meta["state_file"], framework="pt") as f:
                text, tokens = journal.log_of(
                    {name: f.get_tensor(name) for name in ("log.text", "log.tokens")}
                )
            record = meta.get("journal") or {"file": "", "bytes": 0}
            for added, fed in journal.logs(journal.read(folder / record["file"], record["bytes"])):
                text.extend(added)
                tokens.extend(fed)
        except (OSError, SafetensorError, JournalError) as exc:
            raise StateError(f"the saved conversation is unreadable ({exc})") from None
        return text, tokens

    def append(self, session_id: str, saved: dict, meta: dict, record: bytes) -> dict:
        """The record is appended after the committed bytes and synced, then ``meta.json`` (advanced to it) is
        replaced by a rename."""
        generation = self._follows(session_id, saved)
        folder = self.folder(session_id)
        at = meta["journal"]
        length = journal.append(folder / at["file"], at["bytes"], record)
        meta = dict(meta, journal={"file": at["file"], "bytes": length}, generation=generation)
        _write_atomic(folder / "meta.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        return meta

    def write(self, session_id: str, saved: dict | None, meta: dict, blob: bytes) -> dict:
        """New state file, then ``meta.json`` by rename (with an empty journal after it), then old state files
        and journals go."""
        generation = self._follows(session_id, saved)
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

    def _follows(self, session_id: str, saved: dict | None) -> int:
        """The generation a commit after ``saved`` gets; raises ``LeaseLost`` if ``saved`` is not the stored state."""
        expected = 0 if saved is None else int(saved["generation"])
        try:
            stored = self.generation(session_id)
        except StateError:
            stored = -1
        if stored != expected:
            raise LeaseLost(f"the stored state is generation {stored}, this turn followed {expected}")
        return expected + 1

    def delete(self, session_id: str) -> None:
        shutil.rmtree(self.folder(session_id), ignore_errors=True)

    def sweep(self) -> None:
        """Temporary files a crash may have left behind, and the memory files of sessions whose first turn never
        committed; only in sessions no other process holds (it may be writing them now)."""
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
