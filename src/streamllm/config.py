"""User-facing configuration of a stream: which method, how many sinks, how big a window."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .core.policy import DensePolicy, Policy, SinkPolicy, WindowPolicy
from .core.store import KV_DTYPES

METHODS = ("sink", "window", "dense", "recompute")
POSITIONS = ("cache", "text")
# How single new tokens (decoding) go through the model; chunks always use transformers' forward.
DECODE_MODES = ("fast", "int4", "transformers")


RECALL_POSITIONS = ("cache", "fixed")
# How memory picks the blocks it recalls: by the query's attention scores, by the tokens the query shares with
# each block (``core/textindex.py``), or the tokens proposing and attention choosing among them.
RECALL_SELECT = ("attention", "content", "hybrid")
# How the server starts a session from a history that matches none and is longer than the cache.
HISTORY = ("window", "exact")


class ConfigError(ValueError):
    """A configuration value a user supplied is invalid."""


@dataclass(frozen=True)
class MemoryConfig:
    """Memory of the tokens that left the window (``core/memory.py``; ``docs/design.md``, "Memory").

    Evicted tokens are kept per layer in blocks of ``block_size`` consecutive tokens, each with ``reps``
    representative keys per kv head. Every ``refresh`` tokens (and wherever the caller asks for a recall) each
    layer selects ``blocks`` blocks: by default those that hold what the caller's query says (``content``), and
    where there is no query or no such block, those whose representative keys score highest against that
    token's query; attention then sees the sinks, those blocks and the window until the next selection.

    ``positions``: where recalled tokens sit. ``cache`` (default): in text order between the sinks and the window,
    at in-cache positions, as the paper places everything it keeps. ``fixed``: every recalled token at one
    distance from the query, just past the window (InfLLM's choice).

    ``select``: how blocks are chosen (``content`` by default: it finds a line among look-alikes, which attention
    scores do not, and is the same as ``attention`` on text fed without a query). ``attention``: the query's logits against each block's representative
    keys, per layer. ``content``: BM25 of the caller's query tokens (``Stream.feed(..., recall=True)``) against
    the tokens of each block, the same blocks in every layer (attention breaks ties and chooses when no block
    shares a term). ``hybrid``: content proposes ``4 * blocks`` candidates, attention chooses among them per
    layer. ``neighbours``: each chosen block brings the ``neighbours`` blocks that follow it (what comes right
    after a question is its answer), within the ``blocks`` recalled.

    ``ram_mb``: blocks beyond this many MiB of keys and values go to a file in ``dir`` (a temporary one when
    None) and are read back when recalled. Representative keys always stay in RAM and count in the
    budget."""

    block_size: int = 128
    blocks: int = 4
    reps: int = 4
    refresh: int = 256
    ram_mb: int = 1024
    positions: str = "cache"
    select: str = "content"
    neighbours: int = 0
    dir: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.neighbours, int) or isinstance(self.neighbours, bool) or self.neighbours < 0:
            raise ConfigError(f"memory neighbours must be an integer >= 0, got {self.neighbours!r}")
        if self.select not in RECALL_SELECT:
            raise ConfigError(
                f"unknown memory select {self.select!r}; choose one of {', '.join(RECALL_SELECT)}"
            )
        for name in ("block_size", "blocks", "reps", "refresh", "ram_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"memory {name} must be an integer, got {value!r}")
            if value < 1:
                raise ConfigError(f"memory {name} must be >= 1, got {value}")
        if self.reps > self.block_size:
            raise ConfigError(f"memory reps ({self.reps}) cannot exceed the block size ({self.block_size})")
        if self.positions not in RECALL_POSITIONS:
            raise ConfigError(
                f"unknown memory positions {self.positions!r}; choose one of {', '.join(RECALL_POSITIONS)}"
            )

    @property
    def recalled(self) -> int:
        """The most recalled tokens attention sees besides the sinks and the window."""
        return self.blocks * self.block_size


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

    ``kv_dtype``: "model" (default) keeps the cached keys and values in the model's dtype; "int8" keeps them as
    8-bit integers with a float32 scale per token and kv head: about a quarter of the bytes of float32, at a small
    cost in perplexity (``core/store.py``).

    ``memory``: keep the tokens that leave the window and let attention recall the most relevant blocks of them
    (``MemoryConfig``); None (the default) is the paper's method.
    """

    num_sinks: int = 4
    window: int = 1020
    method: str = "sink"
    chunk_size: int = 512
    rebase_every: int = 4096
    positions: str = "cache"
    decode: str = "fast"
    kv_dtype: str = "model"
    memory: MemoryConfig | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"unknown decode mode {self.decode!r}; choose one of {', '.join(DECODE_MODES)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"unknown kv dtype {self.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        if self.kv_dtype != "model" and self.method == "recompute":
            raise ConfigError("recompute keeps no key/value cache, so it has no kv dtype to choose")
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
        if self.memory is not None:
            if self.method != "sink" or self.positions != "cache":
                raise ConfigError("memory works with the sink method at in-cache positions")
            if not isinstance(self.memory, MemoryConfig):
                raise ConfigError(f"memory must be a MemoryConfig, got {self.memory!r}")

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
