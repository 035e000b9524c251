"""``streamllm experiment NAME --out DIR``: the paper's experiments on our models, each writing NAME.csv, NAME.md
and NAME.png. Each takes a ``Context`` and returns a ``Report``."""

from __future__ import annotations

from collections.abc import Callable

from . import attention_map, chat, curves, passkey, recall, sampling, streameval
from .context import Context
from .report import Report

EXPERIMENTS: dict[str, Callable[[Context], Report]] = {
    "methods": curves.methods,
    "sinks": curves.sinks,
    "cache-size": curves.cache_size,
    "newline-sinks": curves.newline_sinks,
    "positions": curves.positions,
    "memory": curves.memory,
    "long": curves.long,
    "attention-map": attention_map.attention_map,
    "streameval": streameval.streameval,
    "chat": chat.chat,
    "sampling": sampling.sampling,
    "passkey": passkey.passkey,
    "recall": recall.recall,
}

__all__ = ["EXPERIMENTS", "Context", "Report"]
