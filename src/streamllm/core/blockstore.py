"""``BlockStore``: where a memory's blocks of keys and values live (``memory.py`` decides what they are).

A block is one layer's keys (before rotary) and values of ``block_size`` consecutive tokens, (1, Hkv, bs, D)
each, named (layer, b). Blocks stay in RAM while the RAM they take, with the memory's representative keys
(``rep_bytes``, which never leave RAM), fits the budget; past it the oldest go to a spill file (in ``folder``,
unlinked once open, so it goes when the stream does) and are read back when recalled. A block the named file
(``path``) holds already leaves RAM without another write.

The named file is a server session's: ``persist`` appends every block it lacks, and a restored memory opens it
(``open_named``) and reads blocks back from it. ``saved[layer]`` are the offsets of that layer's blocks 0, 1, ...
in it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .blockfile import BlockFile, MemoryFileError

Key = tuple[int, int]  # (layer, block)


class BlockStore:
    """``layout``: the files' header (called once the keys' dtype is known); ``reps``: a block's representative
    keys (Hkv, r, D), written beside it in either file."""

    def __init__(
        self,
        budget: int,
        layers: Iterable[int],
        folder: Path | None,
        path: Path | None,
        layout: Callable[[], dict],
        reps: Callable[[int, int], torch.Tensor],
    ):
        self.budget, self.folder, self.path = budget, folder, path
        self._layout, self._reps = layout, reps
        self.ram: OrderedDict[Key, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.ram_bytes = 0  # keys and values of the blocks in RAM
        self.rep_bytes = 0  # representative keys (kept by the memory, always in RAM)
        self.spill: BlockFile | None = None  # blocks past the budget that the named file does not hold
        self.spilled: dict[Key, int] = {}  # their offsets in it
        self.store: BlockFile | None = None  # the named file, once ``persist`` or a restore opened it
        self.saved: dict[int, list[int]] = {layer: [] for layer in layers}
        self.dtype: torch.dtype | None = None  # of the blocks, set by the memory

    def put(self, layer: int, block: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.ram[(layer, block)] = (keys.clone(), values.clone())
        self.ram_bytes += keys.nbytes + values.nbytes
        self.fit()

    def fit(self) -> None:
        """Move the oldest blocks out of RAM until the budget holds."""
        while self.ram_bytes + self.rep_bytes > self.budget:
            if not self.ram:
                raise ValueError(
                    f"the memory's representative keys alone ({self.rep_bytes / 2**20:.0f} MiB) fill its RAM "
                    f"budget of {self.budget / 2**20:.0f} MiB; raise --memory-ram, or --memory-block"
                )
            key, (k, v) = self.ram.popitem(last=False)
            self.ram_bytes -= k.nbytes + v.nbytes
            layer, block = key
            if block < len(self.saved[layer]):
                continue  # the named file holds it already
            if self.spill is None:
                self.spill = BlockFile(self._layout(), folder=self.folder)
            self.spilled[key] = self.spill.append(layer, block, self._reps(layer, block), k, v)

    def load(self, layer: int, block: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's keys and values, of ``shape`` (1, Hkv, bs, D), from wherever it is."""
        key = (layer, block)
        if key in self.ram:
            return self.ram[key]
        saved = self.saved[layer]
        file, offset = (self.store, saved[block]) if block < len(saved) else (self.spill, self.spilled[key])
        if file is None or self.dtype is None:
            raise MemoryFileError(f"block {block} of layer {layer} was never written")
        both = torch.frombuffer(bytearray(file.read_kv(offset)), dtype=self.dtype).view(2, *shape)
        return both[0], both[1]

    def persist(self, todo: list[Key], shape: tuple[int, ...]) -> None:
        """Append blocks ``todo`` (each layer's next ones) to the named file, then sync. Raises
        ``MemoryFileError``; then the file counts as it was before."""
        if self.store is None:
            self.store = BlockFile(self._layout(), path=self.path)
            self.store.create()
        start, done = self.store.size, []
        try:
            for layer, b in todo:
                keys, values = self.load(layer, b, shape)
                done.append(self.store.append(layer, b, self._reps(layer, b), keys, values))
            self.store.sync()
        except MemoryFileError:
            self.store.size = start
            raise
        for (layer, b), offset in zip(todo, done, strict=True):
            self.saved[layer].append(offset)
            self.spilled.pop((layer, b), None)  # its copy in the spill file is not needed any more

    def open_named(self, file_id: str, size: int) -> BlockFile:
        """Open the named file a saved state refers to (its first ``size`` bytes); the caller indexes it."""
        store = BlockFile(self._layout(), path=self.path)
        store.open(file_id, size)
        self.store = store
        return store

    def drop(self, layer: int, count: int) -> None:
        """Forget ``layer``'s blocks from ``count`` on (kept after the state being gone back to)."""
        for key in [k for k in (*self.ram, *self.spilled) if k[0] == layer and k[1] >= count]:
            if (kv := self.ram.pop(key, None)) is not None:
                self.ram_bytes -= kv[0].nbytes + kv[1].nbytes
            self.spilled.pop(key, None)
        del self.saved[layer][count:]

    def stats(self) -> dict:
        return {
            "layer_blocks_in_ram": len(self.ram),  # one layer's block each
            "layer_blocks_on_disk": len(self.spilled) + sum(len(s) for s in self.saved.values()),
            "ram_bytes": self.ram_bytes + self.rep_bytes,
            "disk_bytes": sum(f.size for f in (self.spill, self.store) if f is not None),
        }

    def close(self) -> None:
        for f in (self.spill, self.store):
            if f is not None:
                f.close()
