"""The ``streamllm`` attention function, registered with transformers' ``AttentionInterface``.

For each query at text position t (virtual position t - offset, the position the model rotated it at):
- window keys are stored rotated at their virtual positions, so the query is used as it is;
- sink keys are stored rotated at 0..S-1, so the query is rotated once more, to its in-cache position min(t, S+W).
Both score blocks share one softmax. The mask comes from the policy, so a chunk of many new tokens gets exactly
what token-by-token streaming gives (DESIGN-NOTES, "Exact chunked streaming"). Chunks go through torch's fused CPU
attention kernel for the window block, and the sink block joins its softmax through the kernel's log-sum-exp;
single tokens (decoding) use explicit scores, which copy no keys.

Letters: B batch, H heads, Hkv kv heads, G = H / Hkv, T new tokens, C stored slots, K = C + T keys, D head dim.
"""

from __future__ import annotations

from typing import NamedTuple

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


# Fused attention that also returns each row's log-sum-exp, so the sink block can join the same softmax.
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend(
    layer: SinkLayer, query: torch.Tensor, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """Attention of ``query`` (B, H, T, D) over the layer's stored keys plus its pending new keys, then commit."""
    k_new, v_new = layer.pending  # (B, Hkv, T, D)
    layer.pending = None
    policy = layer.policy
    B, H, T, D = query.shape
    G = H // k_new.shape[1]
    q_pos = torch.arange(layer.seen, layer.seen + T)  # (T,) text positions
    # Second rotation of the query, for the sink keys: from its virtual position to its position relative to the
    # sinks (its in-cache position; its text position with ``positions="text"``).
    delta = policy.cache_positions(q_pos) - (q_pos - layer.offset)  # (T,)
    q_win = query.reshape(B, -1, G * T, D)  # (B, Hkv, G*T, D), query rows grouped per kv head: (g, t)
    q_sink = None
    if policy.num_sinks and bool((delta != 0).any()):
        q_sink = rotate(query, delta, layer.inv_freq).reshape(B, -1, G * T, D)  # (B, Hkv, G*T, D)
    if softcap is None and FLASH_CPU is not None and query.device.type == "cpu" and T > 1:
        out = _attend_fused(layer, k_new, v_new, q_win, q_sink, q_pos, scaling)
    else:
        out = _attend_scores(layer, k_new, v_new, q_win, q_sink, q_pos, scaling, softcap)
    layer.commit(k_new, v_new, q_pos)
    return out.reshape(B, H, T, D).transpose(1, 2).contiguous()  # (B, T, H, D)


def _attend_scores(layer, k_new, v_new, q_win, q_sink, q_pos, scaling, softcap):
    """Explicit scores: stored and new key blocks share one float32 softmax. Copies no keys (decode steps)."""
    S = layer.policy.num_sinks
    G = q_win.shape[2] // q_pos.numel()
    blocks, values = [], []
    if layer.keys is not None:
        k_old, v_old, old_pos = layer.stored()  # (B, Hkv, C, D), (C,)
        scores_old = q_win @ k_old.transpose(-1, -2)  # (B, Hkv, G*T, C)
        if q_sink is not None:
            scores_old[..., :S] = q_sink @ k_old[:, :, :S].transpose(-1, -2)  # (B, Hkv, G*T, S)
        blocks.append(scores_old)
        values.append(v_old)
    else:
        old_pos = torch.empty(0, dtype=torch.long)
    scores_new = q_win @ k_new.transpose(-1, -2)  # (B, Hkv, G*T, T)
    new_sinks = int((q_pos < S).sum())
    if new_sinks and q_sink is not None:
        scores_new[..., :new_sinks] = q_sink @ k_new[:, :, :new_sinks].transpose(-1, -2)  # (B, Hkv, G*T, s)
    blocks.append(scores_new)
    values.append(v_new)

    scores = torch.cat(blocks, dim=-1).float() * scaling  # (B, Hkv, G*T, K)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = layer.policy.visible(q_pos, torch.cat([old_pos, q_pos])).to(scores.device)  # (T, K)
    scores = scores.masked_fill(~visible.repeat(G, 1), float("-inf"))  # rows are (g, t) pairs
    probs = torch.softmax(scores, dim=-1).to(v_new.dtype)  # (B, Hkv, G*T, K)
    out = None
    start = 0
    for v in values:
        part = probs[..., start : start + v.shape[2]] @ v  # (B, Hkv, G*T, D)
        out = part if out is None else out + part
        start += v.shape[2]
    return out


def _attend_fused(layer, k_new, v_new, q_win, q_sink, q_pos, scaling):
    """Fused kernel over the window keys; the few sink keys (seen by the re-rotated query) are merged into the
    same softmax through the kernel's log-sum-exp. Used for chunks, where it is several times faster."""
    if layer.keys is None:
        keys, values, k_pos = k_new, v_new, q_pos  # (B, Hkv, T, D), (T,)
    else:
        k_old, v_old, old_pos = layer.stored()
        keys = torch.cat([k_old, k_new], dim=2)  # (B, Hkv, K, D)
        values = torch.cat([v_old, v_new], dim=2)  # (B, Hkv, K, D)
        k_pos = torch.cat([old_pos, q_pos])  # (K,)
    m = _masks(layer, q_pos, k_pos, q_win.shape[2] // q_pos.numel(), q_win.dtype)
    if q_sink is None or m.sink_cols is None:
        return FLASH_CPU(q_win.contiguous(), keys, values, attn_mask=m.all_bias, scale=scaling)[0]
    out, lse = FLASH_CPU(q_win.contiguous(), keys, values, attn_mask=m.win_bias, scale=scaling)
    lse = lse.float().masked_fill(m.sink_only, float("-inf"))  # (B, Hkv, G*T)
    s_keys, s_values = keys[:, :, m.sink_cols].float(), values[:, :, m.sink_cols].float()  # (B, Hkv, s, D)
    s_scores = (q_sink.float() @ s_keys.transpose(-1, -2)) * scaling  # (B, Hkv, G*T, s)
    s_scores = s_scores.masked_fill(m.sink_hidden, float("-inf"))
    top = torch.maximum(lse, s_scores.amax(-1))  # (B, Hkv, G*T): finite, every query sees itself
    w_win = torch.exp(lse - top)  # (B, Hkv, G*T)
    w_sink = torch.exp(s_scores - top[..., None])  # (B, Hkv, G*T, s)
    total = out.float() * w_win[..., None] + w_sink @ s_values  # (B, Hkv, G*T, D)
    return (total / (w_win + w_sink.sum(-1))[..., None]).to(values.dtype)


class _Masks(NamedTuple):
    all_bias: torch.Tensor  # (1, 1, G*T, K) additive: 0 where visible, -inf elsewhere; rows are (g, t) pairs
    win_bias: torch.Tensor | None  # the same without the sink columns
    sink_cols: torch.Tensor | None  # (K,) bool, the sink keys; None when there are none
    sink_only: torch.Tensor | None  # (G*T,) bool, rows that see no window key
    sink_hidden: torch.Tensor | None  # (G*T, s) bool, sink keys a row does not see


def _masks(layer: SinkLayer, q_pos: torch.Tensor, k_pos: torch.Tensor, G: int, dtype: torch.dtype) -> _Masks:
    """The chunk's masks. Every layer with the same policy holds the same positions, so they are built once per
    forward and shared through the cache's memo."""
    key = (int(q_pos[0]), q_pos.numel(), k_pos.numel(), G, dtype)
    kept = layer.memo.get(layer.policy)
    if kept is not None and kept[0] == key:
        return kept[1]
    visible = layer.policy.visible(q_pos, k_pos).repeat(G, 1)  # (G*T, K)
    sink = (k_pos >= 0) & (k_pos < layer.policy.num_sinks)  # (K,)

    def bias(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(v.shape, dtype=dtype).masked_fill_(~v, float("-inf"))[None, None]

    if bool(sink.any()):
        window = visible & ~sink
        m = _Masks(bias(visible), bias(window), sink, ~window.any(-1), ~visible[:, sink])
    else:
        m = _Masks(bias(visible), None, None, None, None)
    layer.memo[layer.policy] = (key, m)  # one entry per policy: the current chunk's
    return m
