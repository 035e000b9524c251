"""What an operator chooses when starting ``streamllm serve``: limits, keys, where sessions are kept."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import HISTORY, ConfigError, StreamConfig


def owner_of(api_key: str | None) -> str:
    """The owner id of the sessions a key creates: a digest, so the key itself is never written to disk."""
    if api_key is None:
        return "anonymous"
    return hashlib.sha256(b"streamllm-session-owner\0" + api_key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ModelChoice:
    """The model a server runs, as the command line chose it once: ``name`` (built in, a folder, a .gguf file
    or a hub id), ``dtype`` and ``decode`` with "auto" resolved and ``why`` (``defaults.Choice``), and torch's
    CPU ``threads`` (None: torch's default). With a ``ServerConfig`` it is all a server process is built from
    (``app.load_server``); both pickle, so every Ray replica is built from the same two."""

    name: str
    dtype: str
    decode: str
    why: str = ""
    threads: int | None = None


def store_password(path: Path | None) -> str | None:
    """The store's password: the first line of ``path``, else ``STREAMLLM_STORE_PASSWORD``, else None. Raises
    ``ConfigError``."""
    if path is None:
        return os.environ.get("STREAMLLM_STORE_PASSWORD") or None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the store's password ({exc})") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"{path}: the first line must hold the store's password")
    return lines[0].strip()


@dataclass(frozen=True)
class ServerConfig:
    """Limits and policies of one server process.

    ``max_sessions`` bounds how many sessions keep their cache in memory (least recently used ones are
    dropped from memory: they live on in ``state_dir``, or are forgotten when there is none).
    ``max_tokens_limit`` is the largest ``max_tokens`` a request may ask for, and what a request that gives none
    gets (it stops earlier at the end of its turn). ``max_message_chars`` bounds one message; a message longer than the cache is
    fine (it is fed in chunks). ``request_timeout_s`` covers everything from arrival to the last token.
    ``batch_decode`` > 1 lets that many sessions' decode steps share one forward pass (more tokens/s; 1 makes a
    session's replies independent of other traffic even in rare near-ties; ``scheduler.py``). ``bos``: a session starts
    the way the model was trained to (see ``runtime.tokens``); prompts given as token ids are fed as given.
    ``history``: how a resent conversation (replies included) that matches no session enters a new one when it
    is longer than the cache:
    "window" feeds its first ``num_sinks`` tokens and its last ``window`` (a bounded cost, ``turns.bounded``),
    "exact" feeds all of it, as if the session had streamed it from the start.
    ``store``: a ``redis://`` URL of a store shared by several processes (``store.py``; ``store_password`` is
    never shown), instead of ``state_dir``. ``lease_wait_s``: how long a turn waits while another process runs a
    turn of the same session before answering 409; ``lease_ttl_s``: how long a lease in a shared store outlives a
    process that died holding it. ``metrics_public``: ``/metrics`` answers without an API key (for a scraper
    on a trusted network); otherwise it needs one like every other route, when the server has keys.
    """

    model_id: str
    stream: StreamConfig = field(default_factory=StreamConfig)
    api_keys: tuple[str, ...] = ()
    state_dir: Path | None = None
    store: str | None = None
    store_password: str | None = field(default=None, repr=False)
    lease_wait_s: float = 30.0
    lease_ttl_s: float = 15.0
    max_sessions: int = 16
    max_body_bytes: int = 8 * 2**20
    max_tokens_limit: int = 4096
    max_message_chars: int = 1_000_000
    request_timeout_s: float = 600.0
    batch_decode: int = 16
    bos: bool = True  # a session's first text starts with BOS when the tokenizer adds one
    history: str = "window"
    metrics_public: bool = False
    path: dict | None = None  # the dtype and decode path chosen for the model, and why (``defaults.Choice``)

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ConfigError("model_id must not be empty")
        for name in (
            "max_sessions",
            "max_body_bytes",
            "max_tokens_limit",
            "max_message_chars",
            "batch_decode",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.history not in HISTORY:
            raise ConfigError(f"unknown history mode {self.history!r}; choose one of {', '.join(HISTORY)}")
        if self.store is not None and self.state_dir is not None:
            raise ConfigError("give either a state folder or a store URL, not both")
        if not self.lease_wait_s >= 0:
            raise ConfigError(f"lease_wait_s must be >= 0, got {self.lease_wait_s!r}")
        if not self.lease_ttl_s >= 1:
            raise ConfigError(f"lease_ttl_s must be >= 1, got {self.lease_ttl_s!r}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if any(not key or key != key.strip() for key in self.api_keys):
            raise ConfigError("API keys must be non-empty and carry no surrounding whitespace")
