"""User-facing configuration of a stream: which method, how many sinks, how big a window."""

from __future__ import annotations

from dataclasses import dataclass

from .core.policy import DensePolicy, Policy, SinkPolicy, WindowPolicy

METHODS = ("sink", "window", "dense", "recompute")
POSITIONS = ("cache", "text")
# How single new tokens (decoding) go through the model; chunks always use transformers' forward.
DECODE_MODES = ("fast", "int4", "transformers")


class ConfigError(ValueError):
    """A configuration value a user supplied is invalid."""


@dataclass(frozen=True)
class StreamConfig:
    """How a stream keeps its cache (paper Sec. 3.2).

    - ``sink``: StreamingLLM, ``num_sinks`` first tokens plus the ``window`` most recent ones.
    - ``window``: the last ``num_sinks + window`` tokens, no sinks (same memory as ``sink``).
    - ``dense``: nothing is ever evicted.
    - ``recompute``: the last ``num_sinks + window`` tokens rebuilt from scratch for every new token.

    ``chunk_size`` bounds how many new tokens go through the model at once; ``rebase_every`` is how often (in
    tokens) window keys are rotated back so that the positions handed to the model stay small.

    ``positions``: where the sinks sit relative to a query. ``cache`` (the paper): positions are assigned inside
    the cache, so a query is never further than ``num_sinks + window`` from a sink. ``text``: every token keeps its
    original position, so that distance grows without bound. Only the sinks are affected: rotary attention
    depends on distances alone, and distances within the window are the same either way.

    ``decode``: ``fast`` (default) runs single tokens through ``decode.Decoder`` where the architecture has one:
    the same cache and the same results within the dtype's rounding, about twice as fast. ``int4`` does the same
    with 4-bit copies of the weights (8-bit for a matrix not on a 4-bit grid; faster again; logits change
    slightly). ``transformers`` uses the model's own forward for every token.
    """

    num_sinks: int = 4
    window: int = 1020
    method: str = "sink"
    chunk_size: int = 512
    rebase_every: int = 4096
    positions: str = "cache"
    decode: str = "fast"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"unknown decode mode {self.decode!r}; choose one of {', '.join(DECODE_MODES)}")
        for name in ("num_sinks", "window", "chunk_size", "rebase_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.num_sinks < 0:
            raise ConfigError(f"num_sinks must be >= 0, got {self.num_sinks}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.rebase_every < 1:
            raise ConfigError(f"rebase_every must be >= 1, got {self.rebase_every}")

    @property
    def cache_size(self) -> int:
        return self.num_sinks + self.window

    def policy(self) -> Policy:
        """The eviction policy of the attention layers (global layers; see ``Policy.for_layer``)."""
        if self.method == "sink":
            return SinkPolicy(self.num_sinks, self.window, self.positions == "text")
        if self.method == "window":
            return WindowPolicy(self.cache_size)
        if self.method == "dense":
            return DensePolicy()
        raise ConfigError("recompute keeps no cache; it has no eviction policy")
