"""The session store a ``ServerConfig`` names: a state folder, a Redis URL, or none (sessions in memory only).

Kept apart from ``store.py``, the interface both backends implement, so that the interface imports neither.
"""

from __future__ import annotations

from .config import ServerConfig
from .redis_store import RedisStore
from .statedir import StateDir
from .store import Store


def open_store(config: ServerConfig) -> Store | None:
    """The store ``ServerConfig`` names (``state_dir`` or ``store``), or None to keep sessions in memory only."""
    if config.store is not None:
        return RedisStore(
            config.store, config.store_password, config.model_id, config.stream, config.lease_ttl_s
        )
    if config.state_dir is not None:
        return StateDir(config.state_dir, config.model_id, config.stream)
    return None


def store_name(config: ServerConfig) -> str:
    """The store as logs name it: the folder, or the URL (which never carries a password)."""
    return config.store if config.store is not None else str(config.state_dir)
