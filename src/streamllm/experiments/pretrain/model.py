"""The three variants of paper Sec. 3.3, as transformers models the engine streams with no code of its own:

- ``vanilla``: a Llama model trained on sequences cut anywhere in the packed stream.
- ``sink-token``: the same Llama model, trained with one learnable vocabulary entry (``<|sink|>``) prepended to
  every training sequence at position 0. Its config names that entry as BOS, so streams (and recompute's rebuilt
  windows) start with it.
- ``zero-sink``: softmax with one more logit fixed at 0 (a key of zeros with a value of zeros), the paper's
  "SoftMax-off-by-One". This is a gpt-oss-style learned sink with its logit frozen at 0, so the model is a
  Granite SWA model (a Llama with per-head sink logits) whose layers all attend globally, whose multipliers are
  the Llama ones and whose sink logits are zeros that are never trained. The engine streams it through its
  learned-sink path.

Training runs attention through ``ATTENTION`` (PyTorch's fused attention; the zero sink as a key of zeros with a
bias of the sink logit), which also records attention probabilities when a forward is given ``probe={}``.

Shapes: B batch, H heads, T tokens, D head dim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARIANTS = ("vanilla", "sink-token", "zero-sink")
ATTENTION = "streamllm_pretrain"


@dataclass(frozen=True)
class Shape:
    """A model size. The defaults: about 6.8M parameters (2.1M of them the tied 8K embedding)."""

    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 688
    max_positions: int = 2048  # rotary needs no table; room for the evaluation's positions

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )

    def as_dict(self) -> dict:
        return asdict(self)


def build(variant: str, shape: Shape, vocab_size: int, eot_id: int, sink_id: int, seed: int):
    """A freshly initialised model of ``variant`` (the same initial weights for every variant at one seed)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    head_dim = shape.hidden_size // shape.num_heads
    # the keyword arguments both configs take, of several types
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        eos_token_id=eot_id,
        pad_token_id=None,
        bos_token_id=sink_id if variant == "sink-token" else None,
    )
    config: tf.PretrainedConfig
    if variant == "zero-sink":
        config = tf.GraniteSWAConfig(
            **common,
            layer_types=["full_attention"] * shape.num_layers,
            sliding_window=shape.max_positions,  # no layer slides; the model builds that mask regardless
            attention_multiplier=head_dim**-0.5,
            embedding_multiplier=1.0,
            residual_multiplier=1.0,
            logits_scaling=1.0,
        )
    else:
        config = tf.LlamaConfig(**common)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prepare(model)
    return model


def prepare(model) -> None:
    """Freeze the zero sink's logits at 0 and route attention through ``ATTENTION``; called after every load."""
    register()
    for module in model.modules():
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, torch.nn.Parameter):
            with torch.no_grad():
                sinks.zero_()
            sinks.requires_grad_(False)
    model.set_attn_implementation(ATTENTION)


def register() -> None:
    AttentionInterface.register(ATTENTION, pretrain_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def attention_probs(query, key, scaling: float, s_aux=None) -> torch.Tensor:
    """Causal attention probabilities (B, H, T, T), or (B, H, T, T + 1) with the sink column last when ``s_aux``
    (H,) is given: each row of the first T columns then sums to less than 1."""
    T = query.shape[2]
    logits = (query @ key.transpose(-1, -2)).float() * scaling  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    if s_aux is not None:
        column = s_aux.float().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)  # (B, H, T, 1)
        logits = torch.cat([logits, column], dim=-1)
    return torch.softmax(logits, dim=-1)


def pretrain_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, s_aux=None, probe=None, **kwargs
):
    """Plain causal self-attention over whole sequences (training and probing; no cache, no padding, so the
    mask is ignored). With ``probe`` (a dict), layer i's probabilities (B, H, T, T[+1]) are stored at i."""
    G = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(G, dim=1), value.repeat_interleave(G, dim=1)  # (B, H, T, D)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if probe is not None:
        probs = attention_probs(query, key, scaling, s_aux)
        probe[module.layer_idx] = probs.detach()
        out = probs[..., : key.shape[2]].to(value.dtype) @ value  # (B, H, T, D)
    elif s_aux is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        B, H, T, D = query.shape
        zero = key.new_zeros(B, H, 1, D)
        k, v = torch.cat([zero, key], dim=2), torch.cat([zero, value], dim=2)  # (B, H, T + 1, D)
        causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
        bias = torch.zeros(H, T, T, dtype=query.dtype, device=query.device).masked_fill(
            ~causal, float("-inf")
        )
        sink = s_aux.to(query.dtype).view(H, 1, 1).expand(H, T, 1)  # the zero key's logit, 0, plus s_aux
        bias = torch.cat([sink, bias], dim=-1)  # (H, T, T + 1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=bias.unsqueeze(0), scale=scaling)
    return out.transpose(1, 2).contiguous(), None
