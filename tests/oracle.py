"""The reference oracle: the paper's algorithm written as plainly as possible, one token at a time.

It keeps every cached key *before* rotary (un-rotating what the model produced), and at every step rotates the
whole cache at in-cache positions 0..n-1 and the query at position n. Eviction is a Python list trim. Nothing here
shares code with the engine's storage or attention; only ``rotate`` (itself checked against the model's own rotary)
is reused.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from streamllm.rotary import rotate

NAME = "streamllm_oracle"


class OracleState:
    def __init__(self, num_sinks: int, window: int | None, text_positions: bool = False):
        self.num_sinks, self.window, self.text_positions = num_sinks, window, text_positions
        self.positions: dict[int, list[int]] = {}  # layer -> text position of each kept entry
        self.keys: dict[int, list[torch.Tensor]] = {}  # layer -> pre-rotary keys (B, Hkv, D)
        self.values: dict[int, list[torch.Tensor]] = {}
        self.t = 0  # text position of the token being processed


def _keep(state: OracleState, entries: list, sliding_window: int | None) -> list:
    """Trim a layer's list after a step: sinks + last window (or a sliding layer's own window)."""
    if sliding_window is not None:  # a local layer keeps its own window (never more than the cache budget)
        own = sliding_window - 1
        return entries[-(own if state.window is None else min(own, state.num_sinks + state.window)) :]
    if state.window is None:
        return entries
    cap = state.num_sinks + state.window
    if len(entries) <= cap:
        return entries
    return entries[: state.num_sinks] + entries[len(entries) - state.window :]


def oracle_attention(
    module, query, key, value, attention_mask, scaling=None, oracle=None, sliding_window=None, **kwargs
):
    assert query.shape[2] == 1, "the oracle goes one token at a time"
    inv_freq = module.streamllm_inv_freq
    i, t = module.layer_idx, oracle.t
    tpos = torch.tensor([t])
    k_pre = rotate(key.double(), -tpos, inv_freq)[:, :, 0]  # (B, Hkv, D)
    q_pre = rotate(query.double(), -tpos, inv_freq)  # (B, H, 1, D)
    keys = oracle.keys.setdefault(i, []) + [k_pre]
    values = oracle.values.setdefault(i, []) + [value[:, :, 0].double()]
    positions = oracle.positions.setdefault(i, []) + [t]
    n = len(keys) - 1  # the query's in-cache position
    k_at, q_at = (torch.tensor(positions), t) if oracle.text_positions else (torch.arange(n + 1), n)
    K = rotate(torch.stack(keys, dim=2), k_at, inv_freq)  # (B, Hkv, n+1, D)
    V = torch.stack(values, dim=2)
    q = rotate(q_pre, torch.tensor([q_at]), inv_freq)  # (B, H, 1, D)
    G = q.shape[1] // K.shape[1]
    K, V = K.repeat_interleave(G, dim=1), V.repeat_interleave(G, dim=1)
    probs = torch.softmax((q @ K.transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5), dim=-1)
    out = (probs @ V).to(query.dtype)  # (B, H, 1, D)
    oracle.keys[i] = _keep(oracle, keys, sliding_window)
    oracle.values[i] = _keep(oracle, values, sliding_window)
    oracle.positions[i] = _keep(oracle, positions, sliding_window)
    return out.transpose(1, 2), None


AttentionInterface.register(NAME, oracle_attention)


@torch.no_grad()
def oracle_logits(
    model, ids: list[int], num_sinks: int, window: int | None, text_positions: bool = False
) -> torch.Tensor:
    """Logits (N, V) of streaming ``ids`` token by token under the paper's algorithm (or, with
    ``text_positions``, with every kept token at its original position)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        state = OracleState(num_sinks, window, text_positions)
        rows = []
        for t, tok in enumerate(ids):
            state.t = t
            out = model(
                input_ids=torch.tensor([[tok]]),
                position_ids=torch.tensor([[t]]),
                use_cache=False,
                oracle=state,
            )
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)
    finally:
        model.set_attn_implementation(previous)
