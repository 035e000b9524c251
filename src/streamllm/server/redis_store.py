"""The shared store (``--store redis://HOST:PORT/DB``): sessions in Redis or Valkey, for replicas on several
machines. The contract is ``store.Store``'s; the formats (meta, state, journal records) are the local store's.

Keys, under the prefix ``streamllm:``:

- ``sessions``: a sorted set of the saved sessions' ids, scored by the time of their last commit;
- ``s:<id>:meta`` (the committed meta as JSON) and ``s:<id>:gen`` (its generation);
- ``s:<id>:state`` (the last whole state), ``s:<id>:journal`` (the records appended after it) and
  ``s:<id>:memory`` (the memory's blocks file, which only grows);
- ``s:<id>:lease``: a random token with an expiry.

**Commits are one script**, which Redis runs atomically: it checks that the lease still holds this process's
token and that the stored generation is the one the turn followed, then writes the state or appends the record,
appends the memory's new bytes, and replaces the meta. Either all of a turn is stored or none of it, and a turn
that followed an older state is refused (``LeaseLost``).

**Leases expire.** A lease is taken with ``SET NX PX`` and renewed by a thread every third of its time to live
while this process holds it; the script that gives it back deletes it only if it still holds this process's
token. A process that dies holding one (SIGKILL, a lost machine) blocks the session for at most
its time to live (``--lease-ttl``, 15 s by default); the fencing in the commit script makes a late commit by a process whose lease ran out fail.

Everything read is checked before use: the meta against this model and configuration, the state against the
sha256 the meta names, each journal record against its own. The password comes from a file or an environment
variable (``cli/serve.py``), never from the URL, and no message or log line carries it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import struct
import tempfile
import threading
import time
from array import array
from pathlib import Path
from urllib.parse import urlsplit

from ..config import ConfigError, StreamConfig
from . import journal
from .journal import JournalError, journal_name
from .persist import MEMORY_FILE, SESSION_ID, StateError, check_meta
from .store import Lease, LeaseLost, Store, StoreUnavailable

PREFIX = "streamllm:"

_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'lease' end
local gen = tonumber(redis.call('GET', KEYS[2]) or '0')
if gen ~= tonumber(ARGV[2]) then return 'generation ' .. gen end
if ARGV[4] == 'state' then
  redis.call('SET', KEYS[4], ARGV[5])
  redis.call('DEL', KEYS[5])
else
  local have = redis.call('STRLEN', KEYS[5])
  if have ~= tonumber(ARGV[6]) then return 'journal ' .. have end
  redis.call('APPEND', KEYS[5], ARGV[5])
end
if ARGV[8] ~= '' then redis.call('SETRANGE', KEYS[6], tonumber(ARGV[7]), ARGV[8]) end
redis.call('SET', KEYS[3], ARGV[3])
redis.call('SET', KEYS[2], tostring(gen + 1))
redis.call('ZADD', KEYS[7], ARGV[9], ARGV[10])
return 'ok'
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def check_url(url: str) -> str:
    """``url`` if it names a Redis server without a password in it; raises ``ConfigError``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parses the port: a bad one raises ValueError)
    except ValueError as exc:
        raise ConfigError(f"--store {url!r} is not a URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"--store must be a redis:// or rediss:// URL, got {parts.scheme or 'no'} scheme")
    if parts.password is not None:
        raise ConfigError(
            "--store must not carry a password (it would show in the process list); put it in "
            "--store-password-file or the STREAMLLM_STORE_PASSWORD environment variable"
        )
    if not parts.hostname:
        raise ConfigError(f"--store {url!r} names no host")
    return url


class RedisLease(Lease):
    def __init__(self, store: RedisStore, key: str, token: str):
        self.store, self.key, self.token = store, key, token

    def release(self) -> None:
        if self.token:
            token, self.token = self.token, ""
            self.store._let_go(self.key, token)


class RedisStore(Store):
    def __init__(
        self, url: str, password: str | None, model_id: str, config: StreamConfig, lease_ttl_s: float = 15.0
    ):
        import redis

        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._refusals = (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)
        parts = urlsplit(check_url(url))
        self.where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
        self.client = redis.Redis.from_url(
            url, password=password, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
        )
        self.model_id, self.config, self.ttl_ms = model_id, config, int(lease_ttl_s * 1000)
        self._commit = self.client.register_script(_COMMIT)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)
        self._held: dict[str, str] = {}  # lease key -> this process's token
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.scratch = Path(tempfile.mkdtemp(prefix="streamllm-store-"))

    # -- plumbing ------------------------------------------------------------------------------------------------
    def _key(self, session_id: str, part: str) -> str:
        if not SESSION_ID.fullmatch(session_id):
            raise ValueError(f"invalid session id {session_id!r}")
        return f"{PREFIX}s:{session_id}:{part}"

    def _call(self, fn, *args, **kwargs):
        """Run one Redis call; an unreachable or refusing server becomes ``StoreUnavailable``."""
        try:
            return fn(*args, **kwargs)
        except self._refusals as exc:  # before the others: a refused password is a ConnectionError too
            raise StoreUnavailable(f"{self.where} refused the request: {_first_line(exc)}") from None
        except self._errors as exc:
            raise StoreUnavailable(f"{self.where} cannot be reached: {_first_line(exc)}") from None

    def ping(self) -> None:
        self._call(self.client.ping)

    # -- leases --------------------------------------------------------------------------------------------------
    def lease(self, session_id: str) -> RedisLease | None:
        key, token = self._key(session_id, "lease"), secrets.token_hex(16)
        if not self._call(self.client.set, key, token, nx=True, px=self.ttl_ms):
            return None
        with self._lock:
            self._held[key] = token
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._keep_renewing, name="lease-renewer", daemon=True
                )
                self._renewer.start()
        return RedisLease(self, key, token)

    def _let_go(self, key: str, token: str) -> None:
        with self._lock:
            self._held.pop(key, None)
        try:
            self._release(keys=[key], args=[token])
        except (*self._errors, *self._refusals):
            pass  # it runs out by itself

    def _keep_renewing(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            with self._lock:
                held = list(self._held.items())
            for key, token in held:
                try:
                    if not self._renew(keys=[key], args=[token, self.ttl_ms]):
                        with self._lock:  # ran out: the next commit will be refused
                            self._held.pop(key, None)
                except (*self._errors, *self._refusals):
                    pass  # tried again in a third of the time to live

    # -- reading -------------------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        raw = self._call(self.client.zrange, f"{PREFIX}sessions", 0, -1)
        return sorted(i.decode() for i in raw if SESSION_ID.fullmatch(i.decode()))

    def read_meta(self, session_id: str) -> dict:
        return self._checked(session_id, self._call(self.client.get, self._key(session_id, "meta")))

    def _checked(self, session_id: str, raw: bytes | None) -> dict:
        if raw is None:
            raise StateError("its meta is missing from the store")
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateError(f"its meta is unreadable ({exc})") from None
        meta = check_meta(meta, self.model_id, self.config)
        if meta["id"] != session_id:
            raise StateError("its meta belongs to another session")
        return meta

    def generation(self, session_id: str) -> int:
        raw = self._call(self.client.get, self._key(session_id, "gen"))
        return int(raw) if raw is not None else 0

    def saved_at(self, session_id: str) -> float:
        return float(self._call(self.client.zscore, f"{PREFIX}sessions", session_id) or 0.0)

    def memory_file(self, session_id: str) -> Path:
        folder = self.scratch / session_id
        folder.mkdir(exist_ok=True)
        return folder / MEMORY_FILE

    def read(self, session_id: str) -> tuple[dict, bytes, bytes]:
        meta, blob, records = self._read_state(session_id)
        memory = meta.get("memory") or {}
        if int(memory.get("file_bytes") or 0):
            self._fetch_memory(session_id, int(memory["file_bytes"]))
        return meta, blob, records

    def _read_state(self, session_id: str) -> tuple[dict, bytes, bytes]:
        """(meta, state, committed journal) in one transaction, the first two checked; the memory's blocks not."""

        def get(pipe):
            for part in ("meta", "state", "journal"):
                pipe.get(self._key(session_id, part))
            return pipe.execute()

        raw_meta, blob, records = self._call(get, self.client.pipeline(transaction=True))
        meta = self._checked(session_id, raw_meta)
        if blob is None or hashlib.sha256(blob).hexdigest() != meta["state_sha256"]:
            raise StateError("the stored state is missing or corrupted (its sha256 does not match the meta)")
        committed = int(meta["journal"]["bytes"])
        records = records or b""
        if len(records) < committed:
            raise StateError(f"the journal is truncated ({len(records)} of {committed} committed bytes)")
        return meta, blob, records[:committed]

    def _fetch_memory(self, session_id: str, size: int) -> None:
        data = self._call(self.client.getrange, self._key(session_id, "memory"), 0, size - 1)
        if len(data) != size:
            raise StateError(f"the memory's blocks are truncated ({len(data)} of {size} bytes)")
        self.memory_file(session_id).write_bytes(data)

    def read_log(self, session_id: str, meta: dict) -> tuple[bytearray, array]:
        """The stored state's text and tokens, then the journal's additions (the memory's blocks, which the
        session's stream is using, are left alone)."""
        _, blob, records = self._read_state(session_id)
        try:
            (text_dtype, raw_text), (tokens_dtype, raw_tokens) = journal.raw_tensors(
                blob, ("log.text", "log.tokens")
            )
            if (text_dtype, tokens_dtype) != ("U8", "I32"):
                raise ValueError(f"the log is {text_dtype} and {tokens_dtype}")
            text, tokens = bytearray(raw_text), array("i", raw_tokens)
            for added, fed in journal.logs(records):
                text.extend(added)
                tokens.extend(fed)
        except (ValueError, KeyError, TypeError, struct.error, JournalError) as exc:
            raise StateError(f"the saved conversation is unreadable ({exc})") from None
        return text, tokens

    # -- committing ----------------------------------------------------------------------------------------------
    def append(self, session_id: str, saved: dict, meta: dict, record: bytes) -> dict:
        committed = int(saved["journal"]["bytes"])
        meta = dict(meta, journal={"file": saved["journal"]["file"], "bytes": committed + len(record)})
        return self._run_commit(session_id, saved, meta, "record", record, committed)

    def write(self, session_id: str, saved: dict | None, meta: dict, blob: bytes) -> dict:
        generation = 1 if saved is None else int(saved["generation"]) + 1
        meta = dict(  # named as the local store names them, so that either reads the other's meta
            meta,
            state_file=f"state-{generation:08d}.safetensors",
            state_sha256=hashlib.sha256(blob).hexdigest(),
            state_bytes=len(blob),
            journal={"file": journal_name(generation), "bytes": 0},
        )
        return self._run_commit(session_id, saved, meta, "state", blob, 0)

    def _run_commit(
        self, session_id: str, saved: dict | None, meta: dict, kind: str, payload: bytes, committed: int
    ) -> dict:
        expected = 0 if saved is None else int(saved["generation"])
        meta = dict(meta, generation=expected + 1)
        key = self._key(session_id, "lease")
        with self._lock:
            token = self._held.get(key, "")
        offset, data = self._new_memory(session_id, saved, meta)
        keys = [key, *(self._key(session_id, p) for p in ("gen", "meta", "state", "journal", "memory"))]
        args = [token, expected, json.dumps(meta, ensure_ascii=False), kind, payload, committed, offset, data]
        result = self._call(
            self._commit, keys=[*keys, f"{PREFIX}sessions"], args=[*args, time.time(), session_id]
        )
        result = result.decode() if isinstance(result, bytes) else str(result)
        if result == "lease":
            raise LeaseLost("this process's lease on it ran out")
        if result != "ok":
            raise LeaseLost(f"the store holds {result}, this turn followed generation {expected}")
        return meta

    def _new_memory(self, session_id: str, saved: dict | None, meta: dict) -> tuple[int, bytes]:
        """(offset, bytes) of the memory's blocks file that the store lacks: what ``Memory.persist`` appended
        since ``saved``."""
        now = int((meta.get("memory") or {}).get("file_bytes") or 0)
        before = int(((saved or {}).get("memory") or {}).get("file_bytes") or 0)
        if now <= before:
            return 0, b""
        with open(self.memory_file(session_id), "rb") as f:
            f.seek(before)
            data = f.read(now - before)
        if len(data) != now - before:
            raise StateError("the memory's blocks file is shorter than its state says")
        return before, data

    def delete(self, session_id: str) -> None:
        def remove(pipe):
            pipe.delete(*(self._key(session_id, p) for p in ("meta", "gen", "state", "journal", "memory")))
            pipe.zrem(f"{PREFIX}sessions", session_id)
            return pipe.execute()

        self._call(remove, self.client.pipeline(transaction=True))
        self.discard(session_id)

    def discard(self, session_id: str) -> None:
        shutil.rmtree(self.scratch / session_id, ignore_errors=True)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            held, self._held = list(self._held.items()), {}
        for key, token in held:
            try:
                self._release(keys=[key], args=[token])
            except (*self._errors, *self._refusals):
                pass
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.client.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
