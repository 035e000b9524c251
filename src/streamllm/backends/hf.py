"""The transformers adapter: the ``streamllm`` attention function, ``prepare``, a cache made for a model, the
forward pass of a chunk, and ``SinkCache``, the drop-in cache for ``model.generate``.

How the cache reaches the attention function, explicitly (no global state):
- ``forward`` passes it as the keyword argument ``streamllm=`` of the model's forward; transformers hands the
  forward's keyword arguments to the registered attention function of every layer.
- ``model.generate`` cannot be given extra arguments, so ``SinkCache.update``, which transformers calls in every
  layer just before attending, returns the new keys tagged with the cache (``key.streamllm``), and the attention
  function reads the tag off the ``key`` it is handed.
- Families whose attention modules are written out in their own code (BLOOM, MPT, Falcon: ``inline.py``) take
  the cache as an argument instead; ``forward`` hands them a ``Carrier``, whose ``update`` tags the keys as
  ``SinkCache.update`` does.
Either way the attention function looks up the layer's ``Plan``, attends (``attention.attend``) and commits. A
forward pass that ends with a layer that did not attend through the cache (a model not prepared) is refused with
``NotPreparedError``.

Letters: B batch, H heads, Hkv kv heads, T new tokens, D head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..config import StreamConfig
from ..core.cache import Evicted, KVCache, NotPreparedError
from ..core.memory import Memory
from ..core.policy import Policy, SinkPolicy
from .arch import UnsupportedModelError, attention_modules, inline_of, lookup, shape_of
from .attention import TAG, attend_tagged
from .inline import install

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTENTION_NAME = "streamllm"
# the attention module attribute ``prepare`` sets to ``ModelShape.rotary_order``
ORDER = "streamllm_rotary_order"


def register() -> None:
    """Register the attention function (and sdpa's mask builder, for calls made without a cache)."""
    AttentionInterface.register(ATTENTION_NAME, streamllm_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def prepare(model: PreTrainedModel) -> PreTrainedModel:
    """Make ``model`` attend through streamllm caches, and read its ``ModelShape`` (kept on the model). Idempotent;
    returns the model.

    Raises ``UnsupportedModelError`` naming the reason for architectures that cannot stream exactly."""
    arch = lookup(model.config)
    shape = shape_of(model)
    if arch.inline is not None:  # no registry to go through: the modules' forwards take the cache
        try:
            install(arch.inline, attention_modules(model), shape.alibi)
        except ValueError as exc:
            raise UnsupportedModelError(str(exc)) from None
        return model
    register()
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    for module in attention_modules(model):
        setattr(module, ORDER, shape.rotary_order)
    return model


def cache_for(
    model: PreTrainedModel,
    config: StreamConfig,
    on_evict=None,
    rebase: bool = True,
    policy: Policy | None = None,
    memory_file: Path | None = None,
) -> KVCache:
    """An empty cache made for ``model``: each layer's policy (``policy``, or the one ``config`` names; a layer the
    model limits to a sliding window keeps to it) and rotary frequencies, from the model's ``ModelShape``.
    ``memory_file``: where the memory (``config.memory``) persists its blocks when asked to (``Memory.persist``)."""
    lookup(model.config)
    shape = shape_of(model)
    base = policy or config.policy()
    if len(shape.sliding_windows) != shape.num_layers:
        raise NotPreparedError(
            f"found {len(shape.sliding_windows)} attention modules for {shape.num_layers} layers"
        )
    policies = [base.for_layer(span) for span in shape.sliding_windows]
    memory = None
    if config.memory is not None:
        if not isinstance(base, SinkPolicy) or base.text_positions:
            raise ValueError("memory needs the sink policy at in-cache positions")
        if shape.alibi is not None:
            raise UnsupportedModelError(
                "memory places recalled tokens by rotary, and an ALiBi model has none: stream it without memory"
            )
        itemsize = next(model.parameters()).element_size()
        layers = [p == base for p in policies]
        memory = Memory(
            config.memory,
            layers,
            base.num_sinks,
            base.window,
            shape.inv_freqs,
            shape.num_kv_heads,
            shape.head_dim,
            itemsize,
            memory_file,
        )
    limit = shape.position_limit
    capacity = max((p.capacity for p in policies if p.capacity is not None), default=None)
    if limit is not None and capacity is not None and capacity >= limit:
        raise UnsupportedModelError(
            f"this model's rotary changes its frequencies past position {limit - 1} (its original context); a "
            f"cache of {capacity} tokens does not fit inside it, so choose a smaller one"
        )
    rebase_every = config.rebase_every if rebase else None
    return KVCache(
        policies,
        shape.inv_freqs,
        rebase_every,
        on_evict,
        memory,
        position_limit=limit,
        kv_dtype=config.kv_dtype,
    )


def streamllm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query (B, H, T, D) -> ((B, T, H, D), None)."""
    target = kwargs.pop(ATTENTION_NAME, None) or getattr(key, TAG, None)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")  # learned sink logits (gpt-oss)
    if target is None:  # no streamllm cache in play (a plain forward): ordinary attention
        if softcap is not None or sinks is not None:
            return _plain_explicit(query, key, value, attention_mask, scaling, softcap, sinks), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    order = getattr(module, ORDER, None)
    if order is not None:  # rotary on neighbouring dims: the same reordering of queries and keys keeps q . k
        query, key = query[..., order], key[..., order]
    return attend_tagged(target, module.layer_idx, query, key, value, scaling, softcap, sinks), None


def _plain_explicit(query, key, value, mask, scaling: float, softcap, sinks) -> torch.Tensor:
    """Attention with soft-capped logits (Gemma2) or learned sink logits (gpt-oss), which sdpa lacks:
    query (B, H, T, D) -> (B, T, H, D)."""
    G = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(G, dim=1), value.repeat_interleave(G, dim=1)
    logits = (query @ key.transpose(-1, -2)).float() * scaling  # (B, H, T, N)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is None:
        T, N = logits.shape[-2:]
        mask = torch.ones(T, N, dtype=torch.bool, device=query.device).tril(N - T)
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits + mask
    if sinks is not None:
        column = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
        logits = torch.cat([logits, column], dim=-1)
    probs = logits.softmax(-1)[..., : value.shape[2]].to(value.dtype)
    return (probs @ value).transpose(1, 2)


@torch.no_grad()
def forward(
    model: PreTrainedModel, target: KVCache | Sequence[KVCache], ids: torch.Tensor, keep_all: bool = True
) -> torch.Tensor:
    """Feed ``ids`` (R, T) through the model, row r into cache r (one cache: R = 1), every layer attending through
    its cache's plan. -> logits (R, T, V) float32, or (R, 1, V) without ``keep_all``.

    A stream with memory is fed in pieces that each start at most one selection point (``KVCache.split_points``)."""
    if isinstance(target, KVCache) and (cuts := target.split_points(target.seen, ids.shape[1])):
        bounds = [0, *cuts, ids.shape[1]]
        outs = [
            _forward(model, target, ids[:, a:b], keep_all)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(outs, dim=1) if keep_all else outs[-1]
    return _forward(model, target, ids, keep_all)


def _forward(model, target, ids, keep_all):
    caches = [target] if isinstance(target, KVCache) else list(target)
    for cache in caches:
        cache.plan(ids.shape[1])
    route = (
        {"cache": Carrier(target, len(caches[0].layers))}
        if inline_of(model.config)
        else {ATTENTION_NAME: target}
    )
    try:
        out = model(
            input_ids=ids,
            position_ids=torch.cat([cache.position_ids() for cache in caches]),  # (R, T)
            use_cache=False,
            logits_to_keep=0 if keep_all else 1,
            **route,
        )
    except BaseException:
        for cache in caches:
            cache.abandon()
        raise
    if any(cache.plans is not None for cache in caches):
        for cache in caches:
            cache.abandon()
        raise NotPreparedError(
            "the model did not attend through streamllm; call streamllm.prepare(model) first"
        )
    return out.logits.float()


class _LayerView(CacheLayerMixin):
    """What transformers asks of one layer of a cache, answered from the ``KVCache``."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, kv: KVCache, idx: int):
        super().__init__()
        self.kv, self.idx = kv, idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.kv.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.layers[self.idx].length + query_length, 0

    def get_max_length(self) -> int:
        cap = self.kv.layers[self.idx].policy.capacity
        return -1 if cap is None else cap

    def reset(self) -> None:
        pass


class _NoPast(CacheLayerMixin):
    """A layer of a ``Carrier``: no past tokens, so the model builds masks and biases for the new ones only."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class Carrier(Cache):
    """Carries the cache (or the caches, one per row) of one ``forward`` to attention modules that take the cache
    as an argument (``inline.py``): ``update`` tags the keys with it. Whatever the model builds from the lengths
    it reports (masks, ALiBi biases) covers the new tokens only, and streamllm's attention does not read it."""

    tags_keys = True

    def __init__(self, target: KVCache | Sequence[KVCache], num_layers: int):
        self.target = target
        super().__init__(layers=[_NoPast() for _ in range(num_layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        setattr(key_states, TAG, self.target)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class SinkCache(Cache):
    """Drop-in attention-sink cache for ``model.generate`` in transformers 5, made for one (prepared) model::

        cache = SinkCache(model, num_sinks=4, window=1020)
        model.generate(input_ids, past_key_values=cache, max_new_tokens=10_000)

    Reports the number of tokens seen as its sequence length, so ``generate`` hands the model text positions
    (this cache therefore never rebases). The stream's state is ``self.kv``."""

    tags_keys = True  # families whose modules take the cache attend through it (``inline.py``)

    def __init__(
        self,
        model: PreTrainedModel,
        num_sinks: int = 4,
        window: int = 1020,
        method: str = "sink",
        config: StreamConfig | None = None,
        on_evict=None,
    ):
        self.config = config or StreamConfig(num_sinks=num_sinks, window=window, method=method)
        if self.config.memory is not None:
            raise ValueError("SinkCache keeps no memory (generate feeds prompts whole); use streamllm.Stream")
        self.kv = cache_for(model, self.config, on_evict, rebase=False)
        super().__init__(layers=[_LayerView(self.kv, i) for i in range(len(self.kv.layers))])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by each layer just before it attends: plans the new tokens at the first layer, and tags the keys
        with the cache so that the attention function finds it."""
        if layer_idx == 0:
            self.kv.plan(key_states.shape[2])  # refuses if the previous pass left a layer unattended
        elif self.kv.plans is None or self.kv.uncommitted != len(self.kv.layers) - layer_idx:
            self.kv.abandon()
            raise NotPreparedError(
                "the model is not attending through streamllm; call streamllm.prepare(model) before using SinkCache"
            )
        setattr(key_states, TAG, self.kv)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.seen

    def cache_length(self) -> int:
        return self.kv.cache_length()


__all__ = [
    "Carrier",
    "Evicted",
    "NotPreparedError",
    "SinkCache",
    "cache_for",
    "forward",
    "prepare",
    "register",
]
