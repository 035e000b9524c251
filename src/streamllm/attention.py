"""The ``streamllm`` attention function, registered with transformers' ``AttentionInterface``.

For each query at text position t (virtual position t - offset, the position the model rotated it at):
- window keys are stored rotated at their virtual positions, so the query is used as it is;
- sink keys are stored rotated at 0..S-1, so the query is rotated once more, to its in-cache position min(t, S+W).
Both score blocks share one softmax. The mask comes from the policy, so a chunk of many new tokens gets exactly
what token-by-token streaming gives (DESIGN-NOTES, "Exact chunked streaming").

Letters: B batch, H heads, Hkv kv heads, G = H / Hkv, T new tokens, C stored slots, K = C + T keys, D head dim.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import HANDOFF, NotPreparedError, SinkLayer
from .rotary import rotate

ATTENTION_NAME = "streamllm"


def register() -> None:
    """Register the attention function (and sdpa's mask builder, for calls made without a SinkCache)."""
    AttentionInterface.register(ATTENTION_NAME, streamllm_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def streamllm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention signature: query (B, H, T, D) -> ((B, T, H, D), None)."""
    layer = HANDOFF.get()
    if layer is None or layer.pending is None:
        # No SinkCache in play (a plain forward, or another cache): ordinary attention.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    HANDOFF.set(None)
    inv_freq = getattr(module, "streamllm_inv_freq", None)
    if inv_freq is None:
        layer.pending = None
        raise NotPreparedError("the model was not prepared; call streamllm.prepare(model) first")
    layer.bind(layer.base_policy.for_layer(kwargs.get("sliding_window")), inv_freq)
    out = attend(
        layer, query, scaling if scaling is not None else query.shape[-1] ** -0.5, kwargs.get("softcap")
    )
    return out, None


def attend(
    layer: SinkLayer, query: torch.Tensor, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """Attention of ``query`` (B, H, T, D) over the layer's stored keys plus its pending new keys, then commit."""
    k_new, v_new = layer.pending  # (B, Hkv, T, D)
    layer.pending = None
    policy = layer.policy
    B, H, T, D = query.shape
    Hkv = k_new.shape[1]
    G = H // Hkv
    q_pos = torch.arange(layer.seen, layer.seen + T)  # (T,) text positions

    # Second rotation of the query, for the sink keys: from its virtual position to its in-cache position.
    delta = policy.cache_positions(q_pos) - (q_pos - layer.offset)  # (T,)
    q_win = query.reshape(B, Hkv, G * T, D)  # (B, Hkv, G*T, D), query rows grouped per kv head
    q_sink = q_win
    if policy.num_sinks and bool((delta != 0).any()):
        q_sink = rotate(query, delta, layer.inv_freq).reshape(B, Hkv, G * T, D)  # (B, Hkv, G*T, D)

    S = policy.num_sinks
    blocks, values = [], []
    if layer.keys is not None:
        k_old, v_old, old_pos = layer.stored()  # (B, Hkv, C, D), (C,)
        scores_old = q_win @ k_old.transpose(-1, -2)  # (B, Hkv, G*T, C)
        if S and q_sink is not q_win:
            scores_old[..., :S] = q_sink @ k_old[:, :, :S].transpose(-1, -2)  # (B, Hkv, G*T, S)
        blocks.append(scores_old)
        values.append(v_old)
    else:
        old_pos = torch.empty(0, dtype=torch.long)
    scores_new = q_win @ k_new.transpose(-1, -2)  # (B, Hkv, G*T, T)
    new_sinks = int((q_pos < S).sum())
    if new_sinks and q_sink is not q_win:
        scores_new[..., :new_sinks] = q_sink @ k_new[:, :, :new_sinks].transpose(-1, -2)  # (B, Hkv, G*T, s)
    blocks.append(scores_new)
    values.append(v_new)

    scores = torch.cat(blocks, dim=-1).float() * scaling  # (B, Hkv, G*T, K)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = policy.visible(q_pos, torch.cat([old_pos, q_pos])).to(scores.device)  # (T, K)
    scores = scores.masked_fill(~visible.repeat(G, 1), float("-inf"))  # rows are (g, t) pairs
    probs = torch.softmax(scores, dim=-1).to(v_new.dtype)  # (B, Hkv, G*T, K)
    out = None
    start = 0
    for v in values:
        part = probs[..., start : start + v.shape[2]] @ v  # (B, Hkv, G*T, D)
        out = part if out is None else out + part
        start += v.shape[2]
    layer.commit(k_new, v_new, q_pos)
    return out.reshape(B, H, T, D).transpose(1, 2).contiguous()  # (B, T, H, D)
