"""Families whose attention is written out in their own module code instead of going through transformers'
attention registry: BLOOM, MPT and Falcon (its rotary configs and its ALiBi ones).

``install`` gives each attention module of such a model a forward that takes the same arguments and reads them
by name (never by position: upstream has changed the order between releases), projects queries, keys and values
with the module's own weights (and turns them with the model's own rotary cos and sin, where it has one), hands
them to the streamllm cache the model was called with, and projects the result with the module's own output
weights. Called with any other cache, or none, it runs the module's original forward, so a plain call
is still the model's own. This is the one place streamllm replaces a forward: the registry offers no other way
in for these families. ``uninstall`` puts the originals back.

ALiBi (all of BLOOM and MPT, and Falcon with ``alibi=True``) adds ``-m_h * d`` to the score of a query and a key
``d`` positions before it, with a fixed slope ``m_h`` per head and no rotary at all. Each family writes it as a
bias on the key's absolute position, which the softmax makes the same thing. Under streaming, ``d`` is the
in-cache distance, as the paper does for MPT (``docs/design.md``): the text distance to a window key, the distance
from the query's anchor to an anchored one.

Letters: B batch, H heads, Hkv kv heads, T new tokens, D head dim, E hidden size.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
import transformers
from torch import nn
from torch.nn import functional as F

from ..core.rotary import rotate_half
from .attention import TAG, attend_tagged

ORIGINAL = "streamllm_original_forward"  # the module attribute that keeps the forward ``install`` replaced
SLOPES = "streamllm_alibi"  # the module attribute holding the ALiBi slopes (H,), or None


@dataclass(frozen=True)
class Inline:
    """How one family's attention modules stream. ``run(module, args)`` computes the module's output from its
    forward's arguments, by name (``args`` holds every parameter of the module's forward, defaults included):
    upstream may reorder or drop parameters between releases, so nothing here relies on their positions.
    ``reads`` names the parameters ``run`` reads, which the module's forward must still take; ``cache`` is the
    one that carries the cache."""

    family: str
    cache: str
    reads: tuple[str, ...]
    run: Callable[[nn.Module, dict], tuple]
    # (config, H, D) -> per-head bias per position of distance (H,), or None
    slopes: Callable[[Any, int, int], torch.Tensor | None]

    def mismatch(self, module: nn.Module) -> str | None:
        """Why ``module``'s forward cannot be streamed by ``run`` (a parameter it reads is gone), or None."""
        forward = getattr(module, ORIGINAL, module.forward)
        params = inspect.signature(forward).parameters
        missing = [name for name in (self.cache, *self.reads) if name not in params]
        if not missing:
            return None
        return (
            f"{type(module).__name__}.forward no longer takes {', '.join(map(repr, missing))} "
            f"(it takes {', '.join(params)}): streamllm cannot stream {self.family} models with transformers "
            f"{transformers.__version__}"
        )


def streams(cache) -> bool:
    """Whether ``cache`` is one streamllm hands these modules (``hf.Carrier``, ``hf.SinkCache``)."""
    return getattr(cache, "tags_keys", False)


def install(inline: Inline, modules: list[nn.Module], slopes: torch.Tensor | None) -> None:
    """Give each attention module in ``modules`` a forward that streams through streamllm caches (idempotent), with
    the model's ALiBi ``slopes`` (H,) or None. Raises ValueError, before changing anything, where a module's forward
    no longer takes what ``inline`` reads."""
    for module in modules:
        problem = inline.mismatch(module)
        if problem is not None:
            raise ValueError(problem)
    for module in modules:
        if not hasattr(module, ORIGINAL):
            setattr(module, ORIGINAL, module.forward)
        module.forward = MethodType(_forward(inline, inspect.signature(module.forward)), module)
        setattr(module, SLOPES, slopes)


def uninstall(modules: list[nn.Module]) -> None:
    """Put back the forwards ``install`` replaced."""
    for module in modules:
        if hasattr(module, ORIGINAL):
            del module.forward  # the instance attribute: the class's forward shows again
            delattr(module, ORIGINAL)
            delattr(module, SLOPES)


def _forward(inline: Inline, signature: inspect.Signature) -> Callable:
    """The replacement forward: the original one unless called with a streamllm cache, found by its name."""

    def forward(self, *args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        named = dict(bound.arguments)
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                named.update(named.pop(name))
        if not streams(named.get(inline.cache)):
            return getattr(self, ORIGINAL)(*args, **kwargs)
        return inline.run(self, named)

    return forward


def _attend(module, cache, query, key, value, scaling: float) -> torch.Tensor:
    """query (B, H, T, D), key and value (B, Hkv, T, D) -> (B, T, H*D) through the cache's plan."""
    B, _, T, _ = query.shape
    key, value = cache.update(key, value, module.layer_idx)  # plans at the first layer, tags the keys
    target = getattr(key, TAG)
    out = attend_tagged(target, module.layer_idx, query, key, value, scaling, alibi=getattr(module, SLOPES))
    return out.reshape(B, T, -1)  # (B, T, H*D)


# -- ALiBi slopes -------------------------------------------------------------------------------------------------
def _geometric(n: int) -> torch.Tensor:
    """ALiBi's slopes for n heads (Press et al., 2022): 2^(-8 i / n) for i = 1..n when n is a power of two;
    otherwise those of the power of two below n, then every other slope of the one above. -> (n,) float32"""
    p = 2 ** math.floor(math.log2(n))
    slopes = [2 ** (-8 * i / p) for i in range(1, p + 1)]
    slopes += [2 ** (-8 * (2 * i - 1) / (2 * p)) for i in range(1, n - p + 1)]
    return torch.tensor(slopes, dtype=torch.float32)


def _bloom_slopes(config, heads: int, head_dim: int) -> torch.Tensor:
    return _geometric(heads)


def _mpt_slopes(config, heads: int, head_dim: int) -> torch.Tensor:
    """MPT's variant: the power of two at or above n heads, ``alibi_bias_max`` in place of 8, the odd slopes first."""
    n = heads
    p = 2 ** math.ceil(math.log2(n))
    bias_max = config.attn_config.alibi_bias_max
    slopes = torch.tensor([2 ** (-i * bias_max / p) for i in range(1, p + 1)], dtype=torch.float32)  # (p,)
    if p != n:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n]  # (n,)
    return slopes


def _falcon_slopes(config, heads: int, head_dim: int) -> torch.Tensor | None:
    """Falcon rounds BLOOM's slopes to bfloat16 and adds the bias to the scaled scores, divided by sqrt(D)."""
    if not config.alibi:
        return None
    return _geometric(heads).bfloat16().float() / math.sqrt(head_dim)


# -- the families' forwards: each reads its module's arguments by name ------------------------------------------
def _bloom_run(self, args: dict) -> tuple:
    hidden_states = args["hidden_states"]
    B, T, _ = hidden_states.shape
    qkv = self.query_key_value(hidden_states).view(B, T, self.num_heads, 3, self.head_dim)  # (B, T, H, 3, D)
    q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))  # (B, H, T, D) each
    out = self.dense(_attend(self, args["layer_past"], q, k, v, self.inv_norm_factor))  # (B, T, E)
    return args["residual"] + F.dropout(out, p=self.hidden_dropout, training=self.training), None


def _mpt_run(self, args: dict) -> tuple:
    hidden_states = args["hidden_states"]
    B, T, _ = hidden_states.shape
    qkv = self.Wqkv(hidden_states)  # (B, T, 3E)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    return self.out_proj(_attend(self, args["cache"], q, k, v, self.softmax_scale)), None  # (B, T, E)


def _falcon_run(self, args: dict) -> tuple:
    hidden_states = args["hidden_states"]
    B, T, _ = hidden_states.shape
    H, D = self.num_heads, self.head_dim
    qkv = self.query_key_value(hidden_states)  # (B, T, (H + 2 Hkv) D)
    if self.new_decoder_architecture:
        # per kv head: its G queries, then its key and its value
        qkv = qkv.view(B, T, self.num_kv_heads, -1, D)  # (B, T, Hkv, G + 2, D)
        q, k, v = qkv[:, :, :, :-2].reshape(B, T, H, D), qkv[:, :, :, -2], qkv[:, :, :, -1]
    elif self.multi_query:
        # H queries, then one key and one value
        qkv = qkv.view(B, T, H + 2, D)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:-1], qkv[:, :, -1:]
    else:
        qkv = qkv.view(B, T, H, 3, D)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D) twice
    if getattr(self, SLOPES) is None:
        # rotary: the model's own cos and sin at the positions streamllm handed it
        cos, sin = (x.unsqueeze(1) for x in args["position_embeddings"])  # (B, 1, T, D)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    return self.dense(_attend(self, args["layer_past"], q, k, v, self.inv_norm_factor)), None  # (B, T, E)


BLOOM = Inline("BLOOM", "layer_past", ("hidden_states", "residual"), _bloom_run, _bloom_slopes)
MPT = Inline("MPT", "cache", ("hidden_states",), _mpt_run, _mpt_slopes)
FALCON = Inline("Falcon", "layer_past", ("hidden_states", "position_embeddings"), _falcon_run, _falcon_slopes)
