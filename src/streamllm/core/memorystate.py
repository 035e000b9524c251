"""Saving a ``Memory`` and restoring it: what a server session's memory keeps across turns and restarts.

A memory made with a named ``file`` can ``persist``: every block the file lacks is appended to it, and ``state``
then names the file's id and length. A fresh memory restores from that (``load``), reading only representative
keys; the memory the state was taken from rolls back to it instead (a turn undone). A block already in the named
file leaves RAM without another write. The state itself is small: counters that can go to JSON, the tokens of
the blocks being filled, and the text the blocks were indexed by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .blockfile import HEADER, MemoryFileError

if TYPE_CHECKING:
    from .memory import Memory


def persist(memory: Memory) -> None:
    """Append every block the named file lacks to it, then sync: with ``state`` taken after, the memory
    can be restored from that file. Raises ``MemoryFileError``; then the file counts as it was before."""
    if memory.file is None:
        raise RuntimeError("this memory has no named file to persist to")
    saved = memory.kept.saved
    todo = [(layer, b) for layer, mem in memory.layers.items() for b in range(len(saved[layer]), mem.count)]
    if todo:
        memory.kept.persist(todo, memory.block_shape())


def state(memory: Memory) -> tuple[dict, dict[str, torch.Tensor]]:
    """(counters, which can go to JSON; the blocks being filled, as tensors copied to the CPU). Blocks are
    not in it: they stay where they are (``load`` rolls this memory back to the state), and the
    named file holds the ones ``persist`` wrote (a fresh memory restores from it)."""
    store = memory.kept.store
    info: dict = {
        "dtype": None if memory.kept.dtype is None else str(memory.kept.dtype).removeprefix("torch."),
        "file": None if store is None else store.id,
        "file_bytes": 0 if store is None else store.size,
        "marks": sorted(memory.marks),
        "queries": {str(p): q for p, q in memory.queries.items()},
        "recalled": memory.recalled_len,
        "selections": memory.selections,
        "layers": {},
    }
    tensors = {}
    for i, mem in memory.layers.items():
        info["layers"][str(i)] = {
            "count": mem.count,
            "selected": list(mem.selected),
            "at": mem.at,
            "next_pos": mem.next_pos,
        }
        if mem.held:
            for name in ("pos", "keys", "values", "offsets"):
                part = torch.cat(getattr(mem, f"pending_{name}"), dim=2 if name in ("keys", "values") else 0)
                tensors[f"{i}.{name}"] = part.detach().to("cpu", copy=True).contiguous()
    tensors["tokens"] = torch.from_numpy(memory.text.tokens.view().copy())
    return info, tensors


def load(memory: Memory, info: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Go back to what ``state`` returned: this memory drops the blocks kept since (a turn undone), or,
    when it is fresh, reads the representative keys of the blocks from the named file (a stream restored)."""
    if set(info["layers"]) != {str(i) for i in memory.layers}:
        raise ValueError(
            f"memory of layers {sorted(info['layers'])}; this model keeps {sorted(memory.layers)}"
        )
    counts = {i: int(info["layers"][str(i)]["count"]) for i in memory.layers}
    if memory.blocks == 0 and any(counts.values()):
        _restore(memory, info, counts)
    for i, mem in memory.layers.items():
        saved = info["layers"][str(i)]
        if mem.count < counts[i]:
            raise ValueError(f"memory of layer {i} holds {mem.count} blocks, the state {counts[i]}")
        memory.kept.drop(i, counts[i])  # the blocks kept after the state was taken
        mem.count = counts[i]
        mem.selected, mem.at = [int(b) for b in saved["selected"]], int(saved["at"])
        mem.next_pos = None if saved["next_pos"] is None else int(saved["next_pos"])
        if f"{i}.pos" in tensors:
            mem.pending_pos, mem.pending_offsets = [tensors[f"{i}.pos"]], [tensors[f"{i}.offsets"]]
            mem.pending_keys, mem.pending_values = [tensors[f"{i}.keys"]], [tensors[f"{i}.values"]]
            mem.held = mem.pending_pos[0].numel()
        else:
            mem.pending_pos, mem.pending_offsets, mem.pending_keys, mem.pending_values = [], [], [], []
            mem.held = 0
    memory.marks = {int(p) for p in info["marks"]}
    memory.queries = {int(p): [int(i) for i in q] for p, q in info.get("queries", {}).items()}
    memory.recalled_len, memory.selections = int(info["recalled"]), int(info["selections"])
    # A session saved before blocks were indexed by their tokens has none: its blocks get no terms.
    memory.text.cut(min(counts.values(), default=0))
    memory.text.note(0, tensors["tokens"].tolist() if "tokens" in tensors else [])


def _restore(memory: Memory, info: dict, counts: dict[int, int]) -> None:
    """Index the named file a saved state refers to: every record's place, and its representative keys."""
    if memory.file is None or info["file"] is None:
        raise MemoryFileError("the saved state has memory blocks, but no memory file to read them from")
    memory.kept.dtype = getattr(torch, info["dtype"])
    store = memory.kept.open_named(info["file"], int(info["file_bytes"]))
    shape = (memory.kv_heads, memory.config.reps, memory.head_dim)
    for offset in range(HEADER, store.size, store.record):
        layer, block, raw = store.read_reps(offset)
        mem = memory.layers.get(layer)
        if mem is None or block != len(memory.kept.saved[layer]) or block >= counts[layer]:
            raise MemoryFileError(f"memory file corrupted: an unexpected record at offset {offset}")
        reps = torch.frombuffer(bytearray(raw), dtype=memory.kept.dtype).view(shape)
        memory.put_reps(mem, block, reps)
        memory.kept.saved[layer].append(offset)
        mem.count = block + 1
    for i, mem in memory.layers.items():
        if mem.count != counts[i]:
            raise MemoryFileError(f"the memory file holds {mem.count} of layer {i}'s {counts[i]} blocks")
    memory.kept.fit()
