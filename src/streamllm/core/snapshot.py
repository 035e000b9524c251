"""Saving and restoring a ``KVCache``: the whole state, or only what changed since it was last saved.

``state_dict`` holds, per layer, the slots ever written (as stored: the model's dtype, or int8 with scales), every
slot's text position, the counters and the policy's shape; ``load_state_dict`` puts it into the layers of a fresh
cache of the same policies, converting between 8-bit and the model's dtype where the two caches differ, and hands
the counters back for the cache to take (``KVCache.load_state_dict``).

``changes`` holds, per layer, only the slots written since ``KVCache.mark_saved`` (``slots``, their tensors as
stored), with every slot's position and the counters; ``load_changes`` applies it on top of the state it was
taken after. A decoded token writes one slot per layer, so a turn's changes are a few dozen of a thousand slots.
Rebasing turns every window key, so after one (and after a state is loaded, or before anything is saved) the
cache reports no changes but "everything", and the caller saves the whole state instead.

The memory's state (``Memory.state_dict``: counters and the tokens of its unfinished block) is small and goes
whole into both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .cache import KVCache


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def state_dict(cache: KVCache) -> dict:
    """Everything needed to continue the stream later, per layer. Only slots that were ever written are kept (a
    young stream holds fewer than ``capacity`` tokens). Tensors are the live ones, not copies."""
    layers = []
    for store in cache.layers:
        written = (store.slot_pos >= 0).nonzero()
        used = int(written.max()) + 1 if written.numel() else 0
        policy = store.policy
        raw = {"keys": None, "values": None} if store.keys is None else store.raw(slice(0, used))
        layers.append(
            raw
            | {
                "slot_pos": None if store.keys is None else store.slot_pos[:used],  # (used,)
                "dtype": _dtype_name(store.dtype),
                "seen": cache.seen,
                "offset": cache.offset,
                "num_sinks": policy.num_sinks,
                "window": getattr(policy, "window", None),
                "text_positions": bool(getattr(policy, "text_positions", False)),
            }
        )
    state: dict[str, Any] = {"layers": layers}
    if cache.memory is not None:
        state["memory"] = cache.memory.state_dict()  # (counters, tensors); the blocks stay where they are
    return state


def load_state_dict(cache: KVCache, state: dict) -> tuple[int, int]:
    """Restore what ``state_dict`` returned into the layers of a fresh cache (the policies must be the same) and
    its memory. -> the counters (seen, offset)"""
    layers = state["layers"]
    if layers and len(layers) != len(cache.layers):
        raise ValueError(f"the state has {len(layers)} layers, the model {len(cache.layers)}")
    counters = cache.seen, cache.offset
    for idx, (store, saved) in enumerate(zip(cache.layers, layers, strict=False)):
        policy = store.policy
        mine = (policy.num_sinks, getattr(policy, "window", None), bool(getattr(policy, "text_positions", 0)))
        theirs = (saved["num_sinks"], saved["window"], bool(saved.get("text_positions", False)))
        if saved["num_sinks"] is not None and mine != theirs:
            raise ValueError(f"layer {idx}: saved under another policy {theirs}, this cache has {mine}")
        counters = int(saved["seen"]), int(saved["offset"])
        keys = saved.get("keys")
        if keys is None:
            continue
        used = keys.shape[2]
        dtype = getattr(torch, saved["dtype"]) if saved.get("dtype") else keys.dtype
        store.allocate(keys, cache.size_for(policy, max(used, 1), store), dtype)
        store.load_raw(saved, slice(0, used))
        store.slot_pos[:used] = saved["slot_pos"]
    _load_memory(cache, state)
    return counters


def changes(cache: KVCache, changed: list[torch.Tensor], groups: list[int]) -> dict:
    """The slots ``changed`` (per layer, (C,) bool; layers of one policy ``group`` share the mask and the slot
    positions) and what ``load_changes`` needs besides. The first layer of each group carries the changed slots
    and every slot's position; the others name it (``positions_of``)."""
    layers, first = [], {}
    for i, (store, mask, group) in enumerate(zip(cache.layers, changed, groups, strict=True)):
        layer: dict[str, Any]
        if group not in first:
            first[group] = (i, mask.nonzero().flatten())  # (n,)
            layer = {"slots": first[group][1], "slot_pos": store.slot_pos}
        else:
            layer = {"positions_of": first[group][0]}
        layer |= {"dtype": _dtype_name(store.dtype), "seen": cache.seen, "offset": cache.offset}
        layers.append(layer | (store.raw(first[group][1]) if store.keys is not None else {}))
    state: dict[str, Any] = {"layers": layers}
    if cache.memory is not None:
        state["memory"] = cache.memory.state_dict()
    return state


def load_changes(cache: KVCache, state: dict) -> tuple[int, int]:
    """Apply ``changes`` to the layers of the cache as it was when they were counted from, and to its memory.
    -> the counters (seen, offset)"""
    layers = state["layers"]
    if len(layers) != len(cache.layers):
        raise ValueError(f"the changes have {len(layers)} layers, the model {len(cache.layers)}")
    counters = cache.seen, cache.offset
    for store, saved in zip(cache.layers, layers, strict=True):
        counters = int(saved["seen"]), int(saved["offset"])
        if "keys" not in saved:
            continue
        owner = layers[int(saved["positions_of"])] if "positions_of" in saved else saved
        slots, slot_pos = owner["slots"], owner["slot_pos"]
        C = slot_pos.numel()
        dtype = getattr(torch, saved["dtype"]) if saved.get("dtype") else None
        store.allocate(saved["keys"], cache.size_for(store.policy, max(C, 1), store), dtype)
        if store.slot_pos.numel() < C:
            raise ValueError(f"the changes hold {C} slots, the cache {store.slot_pos.numel()}")
        store.load_raw(saved, slots)
        store.slot_pos[:C] = slot_pos
    _load_memory(cache, state)
    return counters


def _load_memory(cache: KVCache, state: dict) -> None:
    if cache.memory is not None and "memory" in state:
        cache.memory.load_state_dict(*state["memory"])
        if cache.memory.recalled_len:  # the recalled blocks, as the last selection placed them
            for i in cache.memory.layers:
                cache.recall_into(i, *cache.memory.recalled(i))
