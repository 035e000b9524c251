"""A stream's state as files and stores hold it: one flat mapping of named tensors and a small JSON-able meta.

``Stream.state()`` and ``Stream.changes()`` give a ``State``; ``Stream.load`` takes one (and the changes saved
after it). Whoever keeps them writes and reads these tensors and this meta as they are, and knows nothing else of
the cache. The names:

- ``layers.<i>.<name>``: layer i's slots as stored (``keys``, ``values``, and an 8-bit cache's ``key_scales`` and
  ``value_scales``), ``slot_pos`` (each slot's text position) and, in changes, ``slots`` (which were written);
- ``memory.<name>``: the memory's unfinished block and its text (``Memory.state_dict``);
- ``recompute.recent`` and ``recompute.prefix``: the tokens a recompute stream keeps instead of a cache.

The meta: ``layers``, per layer the counters (``seen``, ``offset``, ``dtype``, the policy's shape; in changes a
layer that shares another's slot positions names it, ``positions_of``); ``memory``, the memory's counters or None;
in a whole state, ``tokens_seen``. The memory's blocks are in neither: they stay in the stream's memory and its
file (``Stream.persist``).

Tensors are copies on the CPU; ``unflatten`` puts them back on the model's device (slot positions stay on the
CPU, where plans are made).
"""

from __future__ import annotations

import torch

from ..core.blockfile import MemoryFileError

__all__ = ["State", "MemoryFileError", "flatten", "unflatten"]

State = tuple[dict[str, torch.Tensor], dict]

# per-layer entries that are tensors; every other entry of a layer is a counter and goes to the meta
LAYER_TENSORS = ("keys", "values", "key_scales", "value_scales", "slot_pos", "slots")
ON_CPU = ("slot_pos", "slots")


def flatten(nested: dict) -> State:
    """A cache's ``state_dict()`` or ``changes()`` (per-layer dicts, and the memory's (counters, tensors)) as
    named tensors and meta."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(nested["layers"]):
        layers.append({k: v for k, v in layer.items() if k not in LAYER_TENSORS})
        for name in LAYER_TENSORS:
            if layer.get(name) is not None:
                tensors[f"layers.{i}.{name}"] = layer[name].detach().to("cpu", copy=True).contiguous()
    memory = None
    if "memory" in nested:
        memory, pending = nested["memory"]
        tensors |= {f"memory.{name}": t.detach().to("cpu").contiguous() for name, t in pending.items()}
    return tensors, {"layers": layers, "memory": memory}


def unflatten(state: State, device: torch.device, memory: bool = True) -> dict:
    """What ``flatten`` took apart, in the form a cache loads, its tensors on ``device``; ``memory``: with the
    memory's state (where there is one)."""
    tensors, meta = state
    layers = []
    for i, counters in enumerate(meta["layers"]):
        layer = dict(counters)
        for name in LAYER_TENSORS:
            tensor = tensors.get(f"layers.{i}.{name}")
            if tensor is not None:
                layer[name] = tensor if name in ON_CPU else tensor.to(device)
        layers.append(layer)
    nested: dict = {"layers": layers}
    if memory and meta.get("memory") is not None:
        pending = {
            name.removeprefix("memory."): t.to(device)
            for name, t in tensors.items()
            if name.startswith("memory.")
        }
        nested["memory"] = (meta["memory"], pending)
    return nested


def with_memory_of(state: State, later: State) -> State:
    """``state`` with the memory as ``later`` (changes saved after it) left it: a restored memory reads its blocks
    from its file, which has grown since ``state`` was taken."""
    tensors, meta = state
    if later[1].get("memory") is None:
        return state
    kept = {k: t for k, t in tensors.items() if not k.startswith("memory.")}
    return kept | {k: t for k, t in later[0].items() if k.startswith("memory.")}, meta | {
        "memory": later[1]["memory"]
    }
