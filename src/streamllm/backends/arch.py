"""The one table of architectures: which model families stream exactly, and why the others don't; and
``ModelShape``, the one record of a model's shape that every backend reads.

``hf.prepare(model)`` checks a model against the table and reads its ``ModelShape`` (``shape_of``): sizes, rotary
frequencies per layer, the spans of its sliding-window layers. Nothing else reads them off ``model.config``.

Letters: L layers, H query heads, Hkv kv heads, D head dim, R rotated dims (<= D).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import inline as _inline

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


class UnsupportedModelError(ValueError):
    """The model cannot stream exactly with attention sinks."""


@dataclass(frozen=True)
class Arch:
    family: str
    supported: bool
    reason: str = ""
    fast_decode: bool = False  # decode.Decoder runs it (q/k/v and gate/up projections, RMSNorm, SiLU or GELU)
    # Rotary turns neighbouring dims (0, 1), (2, 3), ... instead of the two halves (Cohere, GLM): streamllm then
    # reorders the rotated dims of queries and keys alike (evens, then odds), which leaves every logit as it is
    # and makes the rotation the halves form it computes (``ModelShape.rotary_order``).
    rotary_pairs: bool = False
    # config -> which layers apply no rotary at all (SmolLM3, Cohere2's global layers): their keys never turn
    no_rope: Callable | None = None
    # attention written out in the family's own modules, not through the registry (``inline.py``)
    inline: _inline.Inline | None = None


_ROPE = "RoPE decoder with transformers' rotate-half rotary"
_LEARNED = "learned absolute positions: positions cannot be reassigned inside the cache, only recomputed (use --method recompute)"
_ALIBI = "ALiBi bias from in-cache distances (nothing rotates)"
_FALCON = "Falcon: rotary, or ALiBi from in-cache distances (alibi=True)"

_PAIRS = "RoPE decoder with rotary on neighbouring dims (reordered to the halves form)"


def _smollm3_no_rope(config) -> list[bool]:
    return [not use for use in config.no_rope_layers]


def _cohere2_no_rope(config) -> list[bool]:
    return [kind != "sliding_attention" for kind in config.layer_types]  # only its local layers turn keys


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("Llama / SmolLM", True, _ROPE, fast_decode=True),
    "mistral": Arch("Mistral", True, _ROPE, fast_decode=True),
    "qwen2": Arch("Qwen2 / Qwen2.5", True, _ROPE, fast_decode=True),
    "qwen3": Arch("Qwen3", True, _ROPE, fast_decode=True),
    "gpt_neox": Arch("GPT-NeoX / Pythia (partial rotary)", True, _ROPE),
    "phi": Arch("Phi (partial rotary)", True, _ROPE),
    "gemma3_text": Arch("Gemma3 (per-layer sliding and global attention)", True, _ROPE, fast_decode=True),
    "gemma2": Arch("Gemma2 (sliding and global attention, logit soft-capping)", True, _ROPE),
    "phi3": Arch("Phi-3 / Phi-3.5 / Phi-4 (partial rotary in Phi-4-mini)", True, _ROPE, fast_decode=True),
    "smollm3": Arch("SmolLM3 (every fourth layer without rotary)", True, _ROPE, no_rope=_smollm3_no_rope),
    "olmo2": Arch("OLMo 2", True, _ROPE),
    "olmo3": Arch("OLMo 3 (sliding and global attention)", True, _ROPE),
    "granite": Arch("Granite", True, _ROPE),
    "ministral": Arch("Ministral (sliding and global attention)", True, _ROPE),
    "starcoder2": Arch("StarCoder2", True, _ROPE),
    "cohere": Arch("Cohere Command R", True, _PAIRS, rotary_pairs=True),
    "cohere2": Arch(
        "Cohere Command R7B (global layers without rotary)",
        True,
        _PAIRS,
        rotary_pairs=True,
        no_rope=_cohere2_no_rope,
    ),
    "gpt_oss": Arch("gpt-oss (learned sink logits; sliding and global attention)", True, _ROPE),
    "granite_swa": Arch("Granite SWA (learned sink logits; sliding and global attention)", True, _ROPE),
    "granitemoe_swa": Arch(
        "Granite MoE SWA (learned sink logits; sliding and global attention)", True, _ROPE
    ),
    "glm": Arch("GLM-4 (partial rotary)", True, _PAIRS, rotary_pairs=True),
    "helium": Arch("Helium", True, _PAIRS, rotary_pairs=True),
    "gpt2": Arch("GPT-2", False, _LEARNED),
    "gpt_neo": Arch("GPT-Neo", False, _LEARNED),
    "opt": Arch("OPT", False, _LEARNED),
    "bloom": Arch("BLOOM (ALiBi)", True, _ALIBI, inline=_inline.BLOOM),
    "mpt": Arch("MPT (ALiBi)", True, _ALIBI, inline=_inline.MPT),
    "falcon": Arch("Falcon (rotary or ALiBi)", True, _FALCON, inline=_inline.FALCON),
}

# Rope types with fixed frequencies: a shift is a pure rotation. The factor yarn and longrope apply to cos and sin
# scales the rotated keys and queries themselves, so turning them further keeps it.
FIXED_ROPE = ("default", "linear", "llama3", "yarn", "proportional")
# Rope types whose frequencies change once a position passes the original context (dynamic NTK grows its base,
# longrope swaps short factors for long ones): exact while every position handed to the model stays inside it.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _entry(config: PretrainedConfig) -> Arch | None:
    model_type = getattr(config, "model_type", None)
    return ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None


def lookup(config: PretrainedConfig) -> Arch:
    """The table's entry for a model config; raises ``UnsupportedModelError`` with the reason."""
    arch = _entry(config)
    if arch is None:
        model_type = getattr(config, "model_type", None)
        known = ", ".join(k for k, a in ARCHITECTURES.items() if a.supported)
        raise UnsupportedModelError(f"model type {model_type!r} is not supported (supported: {known})")
    if not arch.supported:
        raise UnsupportedModelError(f"{arch.family} cannot stream with attention sinks: {arch.reason}")
    for params in _rope_parameter_sets(config):
        rope_type = params.get("rope_type", "default")
        if rope_type not in FIXED_ROPE + LENGTH_DEPENDENT_ROPE:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} has not been checked for streaming "
                f"(checked: {', '.join(FIXED_ROPE + LENGTH_DEPENDENT_ROPE)})"
            )
    return arch


def position_limit(config: PretrainedConfig) -> int | None:
    """The first model position at which the model's rotary changes its frequencies (``dynamic``: past
    ``max_position_embeddings``; ``longrope``: past ``original_max_position_embeddings``), or None when they never
    change. A streamed cache keeps every position it hands the model below it."""
    limits = []
    for params in _rope_parameter_sets(config):
        rope_type = params.get("rope_type", "default")
        if rope_type == "dynamic":
            limits.append(config.max_position_embeddings)
        elif rope_type == "longrope":
            limits.append(params.get("original_max_position_embeddings") or config.max_position_embeddings)
    return min(limits, default=None)


def _rope_parameter_sets(config: PretrainedConfig) -> list[dict]:
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) or v is None for v in params.values()):
        return [v for v in params.values() if v]  # per layer type (Gemma3)
    return [params]


def inline_of(config: PretrainedConfig) -> _inline.Inline | None:
    """The table's ``inline`` entry for a model whose attention modules take the cache (``inline.py``), or None."""
    arch = _entry(config)
    return None if arch is None else arch.inline


def _sizes(config: PretrainedConfig) -> tuple[int, int, int]:
    """(H, Hkv, D) as a config states them: the one place they are read off a config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def alibi_slopes(config: PretrainedConfig) -> torch.Tensor | None:
    """An ALiBi model's slopes (H,): the bias per position of distance; None for every other model."""
    inline = inline_of(config)
    if inline is None:
        return None
    heads, _, head_dim = _sizes(config)
    return inline.slopes(config, heads, head_dim)


@dataclass(frozen=True, eq=False)
class ModelShape:
    """What streamllm needs to know of a model, read off it once (``shape_of``) and kept on the model: the
    backends take sizes, rotary and local attention spans from here, never from ``model.config``."""

    # per layer (L,): "full_attention", "sliding_attention", ... as the config names them
    layer_types: tuple[str, ...]
    # H
    num_heads: int
    # Hkv
    num_kv_heads: int
    # D
    head_dim: int
    # per layer (R/2,) float64, the frequencies at init; zeros for a layer whose keys never turn (ALiBi, no rotary)
    inv_freqs: tuple[torch.Tensor, ...]
    # per attention module: the span the model itself limits that layer to (its ``sliding_window``), or None
    sliding_windows: tuple[int | None, ...]
    # (D,) the head dims in the order that makes a neighbouring-dims rotary the halves form, or None
    rotary_order: torch.Tensor | None
    # (H,) ALiBi slopes, or None for a rotary model
    alibi: torch.Tensor | None
    # the first model position at which the rotary changes its frequencies, or None
    position_limit: int | None

    @property
    def num_layers(self) -> int:
        """L"""
        return len(self.layer_types)


# the model attribute ``shape_of`` keeps the model's ``ModelShape`` in
SHAPE = "streamllm_shape"


def shape_of(model: PreTrainedModel) -> ModelShape:
    """The model's ``ModelShape``: read when the model is prepared (``hf.prepare``), or on first use, and kept on
    the model. Raises ``UnsupportedModelError`` for a rotary model without a rotary module."""
    shape = model.__dict__.get(SHAPE)
    if shape is None:
        shape = model.__dict__[SHAPE] = _read_shape(model)
    return shape


def _read_shape(model: PreTrainedModel) -> ModelShape:
    config = model.config
    heads, kv_heads, head_dim = _sizes(config)
    layer_types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    alibi = alibi_slopes(config)
    if alibi is not None:
        # nothing turns: zero frequencies over the whole head
        inv_freqs = tuple(torch.zeros(head_dim // 2, dtype=torch.float64) for _ in layer_types)
    else:
        inv_freqs = layer_inv_freqs(model, layer_types)
    # transformers gives a layer limited to a local span its ``sliding_window``; a config's applies to every layer
    sliding_windows = tuple(
        getattr(m, "sliding_window", getattr(config, "sliding_window", None))
        for m in attention_modules(model)
    )
    return ModelShape(
        layer_types=layer_types,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        inv_freqs=inv_freqs,
        sliding_windows=sliding_windows,
        rotary_order=_rotary_order(config, head_dim, 2 * inv_freqs[0].numel()),
        alibi=alibi,
        position_limit=position_limit(config),
    )


def layer_inv_freqs(model: PreTrainedModel, layer_types: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """The rotary ``inv_freq`` (R/2,) of every decoder layer (of the types ``layer_types``), read from the model's
    own rotary module. ``shape_of`` calls it once; everything else reads ``ModelShape.inv_freqs``."""
    config = model.config
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        raise UnsupportedModelError("the model has no rotary embedding module")
    freqs = []
    arch = _entry(config)
    no_rope = arch.no_rope(config) if arch is not None and arch.no_rope else [False] * len(layer_types)
    for layer_type, unturned in zip(layer_types, no_rope, strict=True):
        # the frequencies at init (dynamic rope rewrites ``inv_freq`` after a pass beyond the original context)
        names = (f"{layer_type}_original_inv_freq", "original_inv_freq", "inv_freq")
        found = next(t for name in names if isinstance(t := getattr(rotary, name, None), torch.Tensor))
        inv_freq = found.detach().to(torch.float64).cpu()
        # zero frequencies: no turn at all
        freqs.append(torch.zeros_like(inv_freq) if unturned else inv_freq)
    return tuple(freqs)


def _rotary_order(config: PretrainedConfig, head_dim: int, rotary_dims: int) -> torch.Tensor | None:
    """For a family whose rotary turns neighbouring dims: the order of head dims (the rotated ones' evens, their
    odds, then the unrotated ones) in which that rotation is the halves form ``core/rotary.py`` computes. None
    for the others."""
    arch = _entry(config)
    if arch is None or not arch.rotary_pairs:
        return None
    D, R = head_dim, rotary_dims
    return torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2), torch.arange(R, D)])


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    found = [
        (idx, m)
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and isinstance(idx := getattr(m, "layer_idx", None), int)
    ]
    return [m for _, m in sorted(found, key=lambda pair: pair[0])]
