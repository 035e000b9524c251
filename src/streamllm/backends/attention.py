"""Sink-aware attention in torch, written once: every torch backend (the transformers attention function, the
Python decode step, the batched step) calls ``attend`` with a layer's ``Plan``.

For each query at text position t (model position t - offset, the position the model rotated it at):
- window keys are stored rotated at their model positions, so the query is used as it is;
- anchored keys (the sinks) are stored rotated at 0..S-1, so the query is turned once more, by the plan's
  ``anchor_shift``, to its anchor position (its in-cache position min(t, S+W) for the paper's policy).
Both score blocks share one softmax, and the plan's ``visible`` mask makes a chunk of many new tokens exactly what
token-by-token streaming gives (``docs/design.md``). On the CPU the window block goes through torch's fused
attention kernel, and the anchored keys join its softmax through the kernel's log-sum-exp: for a chunk over the
stored and new keys together, for a single token over the stored keys in place (its own key joins like the
anchored ones), so decoding copies no keys. Elsewhere, or with a soft cap, learned sinks or an ALiBi bias, scores
are explicit, in float32.

ALiBi models (``inline.py``) have no rotary: nothing turns, and each score gets ``-m_h * d``, with ``d`` the
in-cache distance: from the query's text position to a window key's, from its anchor to an anchored key's.

Letters: B batch, H heads, Hkv kv heads, G = H / Hkv, T new tokens, C stored slots, K = C + T keys, D head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..core.cache import KVCache, NotPreparedError
from ..core.plan import Plan
from ..core.rotary import rotate

TAG = "streamllm"  # the attribute a cache's ``update`` sets on the keys it returns: the stream(s) they belong to

# Fused attention that also returns each row's log-sum-exp, so the anchored block can join the same softmax.
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend(
    plan: Plan,
    query: torch.Tensor,
    stored: tuple[torch.Tensor, torch.Tensor] | None,
    new: tuple[torch.Tensor, torch.Tensor],
    inv_freq: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    recalled: tuple[torch.Tensor, torch.Tensor] | None = None,
    sinks: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (B, H, T, D) over the ``stored`` keys and values (B, Hkv, C, D) (None before the
    first commit), the ``new`` ones (B, Hkv, T, D) and the ``recalled`` ones (B, Hkv, M, D) (from memory,
    rotated at in-cache positions, seen by every query from its anchor), as ``plan`` says. ``sinks``: a model's
    learned sink logits (H,) (gpt-oss), one more softmax column per head with no value. ``alibi``: ALiBi slopes
    (H,), the bias per position of in-cache distance (added to the scaled scores). -> (B, H, T, D)"""
    k_new, v_new = new
    B, H, T, D = query.shape
    G = H // k_new.shape[1]
    q_win = query.reshape(B, -1, G * T, D)  # (B, Hkv, G*T, D), query rows grouped per kv head: (g, t)
    q_anchor = None
    if alibi is None and (plan.turns or recalled is not None):
        q_anchor = rotate(query, plan.anchor_shift, inv_freq).reshape(B, -1, G * T, D)  # (B, Hkv, G*T, D)
    fused = (
        softcap is None
        and sinks is None
        and alibi is None
        and FLASH_CPU is not None
        and query.device.type == "cpu"
    )
    if fused and T > 1:
        out = _fused(plan, stored, k_new, v_new, q_win, q_anchor, scaling, recalled)
    elif fused and stored is not None:
        out = _fused_one(plan, stored, k_new, v_new, q_win, q_anchor, scaling, recalled)
    else:
        bias = None if alibi is None else _alibi_bias(plan, alibi, G, stored is not None)
        out = _scores(plan, stored, k_new, v_new, q_win, q_anchor, scaling, softcap, recalled, sinks, bias)
    return out.reshape(B, H, T, D)


def _alibi_bias(plan: Plan, slopes: torch.Tensor, G: int, with_stored: bool) -> torch.Tensor:
    """The ALiBi bias of every query row (g, t) and key, -m_h * (in-cache distance), built once per plan for the
    layers that share it. -> (Hkv, G*T, K) float32"""
    key = ("alibi", id(slopes), G, with_stored)
    if key not in plan.memo:
        C = plan.key_pos.numel() - plan.text_pos.numel()
        keys = plan.key_pos if with_stored else plan.key_pos[C:]  # (K,)
        anchored = plan.anchored if with_stored else plan.anchored[C:]  # (K,)
        anchor = plan.model_pos + plan.anchor_shift  # (T,) each query's in-cache position
        dist = torch.where(
            anchored[None, :], anchor[:, None] - keys[None, :], plan.text_pos[:, None] - keys[None, :]
        )  # (T, K)
        bias = -slopes.float()[:, None, None] * dist.float()  # (H, T, K), head h = kv head * G + g
        plan.memo[key] = bias.reshape(-1, G * dist.shape[0], dist.shape[1])  # (Hkv, G*T, K)
    return plan.memo[key]


def _scores(
    plan, stored, k_new, v_new, q_win, q_anchor, scaling, softcap, recalled=None, sinks=None, bias=None
):
    """Explicit scores: stored, new and recalled key blocks (and learned sinks) share one float32 softmax, with
    an additive ``bias`` (Hkv, G*T, K) where given. Copies no keys."""
    T = plan.text_pos.numel()
    G = q_win.shape[2] // T
    C = plan.key_pos.numel() - T
    blocks, values = [], []
    if stored is not None:
        k_old, v_old = stored  # (B, Hkv, C, D)
        blocks.append(_block_scores(q_win, q_anchor, k_old, plan.anchored[:C]))  # (B, Hkv, G*T, C)
        values.append(v_old)
    blocks.append(_block_scores(q_win, q_anchor, k_new, plan.anchored[C:]))  # (B, Hkv, G*T, T)
    values.append(v_new)
    scores = torch.cat(blocks, dim=-1).float() * scaling  # (B, Hkv, G*T, K)
    if bias is not None:
        scores = scores + bias
    if recalled is not None:
        scores = torch.cat([scores, (q_anchor @ recalled[0].transpose(-1, -2)).float() * scaling], dim=-1)
        values.append(recalled[1])
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = plan.visible if stored is not None else plan.visible[:, C:]  # (T, K)
    visible = visible.to(scores.device).repeat(G, 1)  # rows: (g, t)
    if recalled is not None:  # every query sees all of them, from its anchor
        visible = torch.cat([visible, visible.new_ones(visible.shape[0], recalled[0].shape[2])], dim=1)
    scores = scores.masked_fill(~visible, float("-inf"))
    # head h = kv head * G + g; rows (g, t): the column after the last key, dropped below
    if sinks is not None:
        column = (
            sinks.float().view(1, -1, G, 1).expand(scores.shape[0], -1, G, T).reshape(*scores.shape[:3], 1)
        )
        scores = torch.cat([scores, column], dim=-1)
    probs = torch.softmax(scores, dim=-1).to(v_new.dtype)  # (B, Hkv, G*T, K (+ 1))
    out, start = None, 0
    for v in values:
        part = probs[..., start : start + v.shape[2]] @ v  # (B, Hkv, G*T, D)
        out = part if out is None else out + part
        start += v.shape[2]
    return out


def _block_scores(q_win, q_anchor, keys, anchored):
    """Scores of one key block (B, Hkv, G*T, n): the turned query for its anchored keys (always the first ones)."""
    scores = q_win @ keys.transpose(-1, -2)  # (B, Hkv, G*T, n)
    s = int(anchored.sum())
    if s and q_anchor is not None:
        scores[..., :s] = q_anchor @ keys[:, :, :s].transpose(-1, -2)  # (B, Hkv, G*T, s)
    return scores


def _fused(plan, stored, k_new, v_new, q_win, q_anchor, scaling, recalled=None):
    """Fused kernel over the window keys; the few anchored keys and the recalled ones (both seen by the turned
    query) go through a second call of the kernel, and the two merge into one softmax through their
    log-sum-exps. Used for chunks, where it is several times faster than explicit scores."""
    T = plan.text_pos.numel()
    if stored is None:
        keys, values = k_new, v_new  # (B, Hkv, T, D)
    else:
        keys = torch.cat([stored[0], k_new], dim=2)  # (B, Hkv, K, D)
        values = torch.cat([stored[1], v_new], dim=2)  # (B, Hkv, K, D)
    m = _masks(plan, stored is not None, q_win.shape[2] // T, q_win.dtype)
    turned = plan.turns and m.anchor_cols is not None  # anchored keys seen by the turned query
    if not turned and recalled is None:
        return FLASH_CPU(q_win.contiguous(), keys, values, attn_mask=m.all_bias, scale=scaling)[0]
    if turned:
        out, lse = FLASH_CPU(q_win.contiguous(), keys, values, attn_mask=m.win_bias, scale=scaling)[:2]
        lse = lse.float().masked_fill(m.anchor_only, float("-inf"))  # (B, Hkv, G*T)
        a_keys, a_values, a_bias = keys[:, :, m.anchor_cols], values[:, :, m.anchor_cols], m.anchor_bias
    else:
        out, lse = FLASH_CPU(q_win.contiguous(), keys, values, attn_mask=m.all_bias, scale=scaling)[:2]
        lse = lse.float()
        a_keys = a_values = a_bias = None
    if recalled is not None:  # every query sees all of them
        r_keys, r_values = recalled[0].to(keys.dtype), recalled[1].to(values.dtype)
        if a_keys is None:
            a_keys, a_values = r_keys, r_values
        else:
            a_keys, a_values = torch.cat([a_keys, r_keys], dim=2), torch.cat([a_values, r_values], dim=2)
            a_bias = torch.cat([a_bias, a_bias.new_zeros(*a_bias.shape[:-1], r_keys.shape[2])], dim=-1)
    a_out, a_lse = FLASH_CPU(q_anchor.contiguous(), a_keys, a_values, attn_mask=a_bias, scale=scaling)[:2]
    return _merge(out, lse, a_out, a_lse.float(), values.dtype)


def _merge(out, lse, a_out, a_lse, dtype):
    """One softmax from two blocks of keys, each attended by the fused kernel: outputs (B, Hkv, R, D) and
    float32 log-sum-exps (B, Hkv, R), -inf where a row sees no key of the block (every row sees at least one
    key of one block). -> (B, Hkv, R, D) in ``dtype``"""
    top = torch.maximum(lse, a_lse)  # (B, Hkv, R)
    w, a_w = torch.exp(lse - top)[..., None], torch.exp(a_lse - top)[..., None]  # (B, Hkv, R, 1)
    # a row that sees no key of a block has weight 0 there, whatever the kernel wrote for it
    total = torch.where(w > 0, out.float() * w, 0.0) + torch.where(a_w > 0, a_out.float() * a_w, 0.0)
    return (total / (w + a_w)).to(dtype)


def _fused_one(plan, stored, k_new, v_new, q_win, q_anchor, scaling, recalled=None):
    """One new token (T = 1): the fused kernel over the stored window keys in place (no copy of the cache), with
    the token's own key and the anchored keys merged into the same softmax through the kernel's log-sum-exp."""
    k_old, v_old = stored  # (B, Hkv, C, D)
    C = k_old.shape[2]
    key = ("one", q_win.dtype)
    if key not in plan.memo:
        window = plan.visible[0, :C] & ~plan.anchored[:C]  # (C,)
        bias = torch.zeros(C, dtype=q_win.dtype).masked_fill_(~window, float("-inf"))[None, None, None]
        s = int((plan.visible[0, :C] & plan.anchored[:C]).sum())  # the anchored keys it sees: slots 0..s-1
        plan.memo[key] = (bias if bool(window.any()) else None, s)
    bias, s = plan.memo[key]
    q = q_anchor if q_anchor is not None else q_win
    explicit = [(q_win.float() @ k_new.float().transpose(-1, -2)) * scaling]  # (B, Hkv, G, 1): itself
    values = [v_new.float()]
    if s:
        explicit.append((q.float() @ k_old[:, :, :s].float().transpose(-1, -2)) * scaling)  # (B, Hkv, G, s)
        values.append(v_old[:, :, :s].float())
    if recalled is not None:
        explicit.append(
            (q_anchor.float() @ recalled[0].float().transpose(-1, -2)) * scaling
        )  # (B, Hkv, G, M)
        values.append(recalled[1].float())
    scores, vals = (
        torch.cat(explicit, dim=-1),
        torch.cat(values, dim=2),
    )  # (B, Hkv, G, 1 + s), (B, Hkv, 1 + s, D)
    fused = None
    if bias is not None:
        out, lse = FLASH_CPU(q_win.contiguous(), k_old, v_old, attn_mask=bias, scale=scaling)
        fused = (out, lse.float())
    return _join(fused, scores, vals, v_new.dtype)


def _join(fused, scores, values, dtype):
    """One softmax over the fused kernel's block (its output (B, Hkv, R, D) and float32 log-sum-exp (B, Hkv, R),
    or None) and a block of explicit float32 ``scores`` (B, Hkv, R, n) over ``values`` (B, Hkv, n, D). Every row
    sees at least one key, so its maximum is finite. -> (B, Hkv, R, D) in ``dtype``"""
    top = scores.amax(-1)  # (B, Hkv, R)
    if fused is not None:
        out, lse = fused
        top = torch.maximum(lse, top)
    w = torch.exp(scores - top[..., None])  # (B, Hkv, R, n)
    total, norm = w @ values, w.sum(-1)  # (B, Hkv, R, D), (B, Hkv, R)
    if fused is not None:
        w_fused = torch.exp(lse - top)  # (B, Hkv, R)
        total, norm = out.float() * w_fused[..., None] + total, w_fused + norm
    return (total / norm[..., None]).to(dtype)


class _Masks(NamedTuple):
    all_bias: torch.Tensor  # (1, 1, G*T, K) additive: 0 where visible, -inf elsewhere; rows are (g, t) pairs
    win_bias: torch.Tensor | None  # the same without the anchored columns
    anchor_cols: torch.Tensor | None  # (K,) bool, the anchored keys; None when there are none
    anchor_only: torch.Tensor | None  # (G*T,) bool, rows that see no window key
    anchor_bias: torch.Tensor | None  # (1, 1, G*T, s) additive: 0 where an anchored key is seen


def _masks(plan: Plan, with_stored: bool, G: int, dtype: torch.dtype) -> _Masks:
    """The chunk's masks, built once per plan: every layer that shares the plan shares them."""
    key = ("fused", with_stored, G, dtype)
    if key in plan.memo:
        return plan.memo[key]
    C = plan.key_pos.numel() - plan.text_pos.numel()
    cols = slice(None) if with_stored else slice(C, None)
    visible = plan.visible[:, cols].repeat(G, 1)  # (G*T, K)
    anchored = plan.anchored[cols]  # (K,)

    def bias(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(v.shape, dtype=dtype).masked_fill_(~v, float("-inf"))[None, None]

    if bool(anchored.any()):
        window = visible & ~anchored
        m = _Masks(bias(visible), bias(window), anchored, ~window.any(-1), bias(visible[:, anchored]))
    else:
        m = _Masks(bias(visible), None, None, None, None)
    plan.memo[key] = m
    return m


def attend_layer(
    cache: KVCache, layer_idx: int, query, key, value, scaling: float, softcap=None, sinks=None, alibi=None
) -> torch.Tensor:
    """One layer of one stream: attend as its plan says, then commit. query (B, H, T, D) -> (B, T, H, D)"""
    if layer_idx >= len(cache.layers):
        raise NotPreparedError(f"the cache was made for a model with {len(cache.layers)} layers")
    if cache.plans is None:
        raise NotPreparedError("the cache has no planned tokens; pass it through streamllm's forward")
    store = cache.layers[layer_idx]
    if store.keys is not None and store.keys.shape[1::2] != key.shape[1::2]:
        raise NotPreparedError(
            f"the cache was made for another model: keys of shape {tuple(store.keys.shape[1::2])} "
            f"(kv heads, head dim), this model's are {tuple(key.shape[1::2])}"
        )
    recalled = cache.recall(layer_idx, query)
    out = attend(
        cache.plans[layer_idx],
        query,
        store.stored(),
        # an 8-bit cache: new tokens see each other as stored, so a chunk is exact
        store.as_stored(key, value),
        store.inv_freq,
        scaling,
        softcap,
        recalled,
        sinks,
        alibi,
    )
    cache.commit(layer_idx, key, value)
    return out.transpose(1, 2).contiguous()


def attend_tagged(
    target, layer_idx: int, query, key, value, scaling: float, softcap=None, sinks=None, alibi=None
):
    """``attend_layer`` for one cache, or row by row for a sequence of caches (several streams, one row each,
    ``batched.py``). query (R, H, T, D) -> (R, T, H, D)"""
    if isinstance(target, KVCache):
        return attend_layer(target, layer_idx, query, key, value, scaling, softcap, sinks, alibi)
    return torch.cat(
        [
            attend_layer(
                cache,
                layer_idx,
                query[r : r + 1],
                key[r : r + 1],
                value[r : r + 1],
                scaling,
                softcap,
                sinks,
                alibi,
            )
            for r, cache in enumerate(target)
        ]
    )
