"""``Memory``: the tokens that left a stream's window, kept in blocks and recalled when they matter.

Every layer with the sink policy keeps its own memory (its keys differ from every other layer's); layers the model
limits to a sliding window keep none. The rules (derivation and the reasons in ``docs/design.md``, "Memory"):

- **Blocks.** The window evicts tokens in text order, so the tokens S, S+1, ... fill block 0, 1, ... of
  ``block_size`` tokens each. Keys are kept *before* rotary (turned back by the position they were rotated at), so
  a block can be placed anywhere later. A block joins the memory once all its tokens have left.
- **Representative keys.** Per kv head, the ``reps`` keys of the block that lie farthest from the block's mean
  key: the tokens that stand out of their surroundings, which a query looking for something specific finds.
- **Selection.** At a selection point (every ``refresh``-th token, and any token the caller marks with
  ``recall_at``), each layer scores every block with the query of that token: per query head, the largest
  logit its representative keys would get at distance ``window + 1`` (just past the window), summed over the
  heads. The ``blocks`` best (ties: the older block) are recalled, in text order, until the next selection point.
  Selection points depend only on positions, and a chunk never spans one (``KVCache.plan`` refuses it,
  ``hf.forward`` splits there), so a chunk selects exactly what token-by-token processing selects.
- **Positions.** The query sees recalled keys like the sinks, from its anchor position: ``cache`` places block j
  of the selection at in-cache positions S + j*block_size ..., between the sinks and the window, and the anchor
  moves up by the recalled length (everything the query sees sits at in-cache positions, as in the paper);
  ``fixed`` places every recalled token at distance ``window + 1`` from the query.
- **Where blocks live.** Keys and values of blocks stay in RAM up to ``ram_mb``; past it the oldest ones move to a
  file (``dir``; unlinked once open, so it goes when the stream does) and are read back when recalled.
  Representative keys always stay in RAM and count in the budget.

Letters: Hkv kv heads, G query heads per kv head, D head dim, N tokens, Nb blocks, r representative keys, M
recalled tokens.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..config import MemoryConfig
from .rotary import rotate


class MemoryFileError(RuntimeError):
    """The memory file could not be written or read back: the stream cannot keep its memory."""


class _Spill:
    """The file blocks move to past the RAM budget: appended, read back by offset, never rewritten."""

    def __init__(self, folder):
        self.fd: int | None = None
        self.folder = folder
        self.size = 0

    def _open(self) -> int:
        if self.fd is None:
            try:
                fd, path = tempfile.mkstemp(prefix="streamllm-memory-", dir=self.folder)
            except OSError as exc:
                raise MemoryFileError(
                    f"cannot create a memory file in {self.folder or 'the temp folder'}: {exc.strerror}"
                ) from None
            os.unlink(path)  # the file lives as long as the stream holds it open
            self.fd = fd
        return self.fd

    def write(self, data: bytes) -> int:
        fd, offset, view = self._open(), self.size, memoryview(data)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise MemoryFileError(f"memory file write failed: {exc.strerror}") from None
        self.size += len(data)
        return offset

    def read(self, offset: int, n: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise MemoryFileError(f"memory file truncated: {len(data)} of {n} bytes at offset {offset}")
        return data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # a stream that is reset or dropped lets its file go
        self.close()


class _LayerMemory:
    """One layer's blocks: representative keys (Nb, Hkv, r, D), the pending tokens of the block being filled,
    and the blocks selected last."""

    def __init__(self):
        self.reps: torch.Tensor | None = None  # (capacity, Hkv, r, D), rows 0..Nb-1 used
        self.count = 0
        self.pending_pos: list[torch.Tensor] = []
        self.pending_keys: list[torch.Tensor] = []  # (1, Hkv, n, D) as stored: rotated at position - offset
        self.pending_values: list[torch.Tensor] = []
        # (n,) the rebasing offset each waiting key was rotated at
        self.pending_offsets: list[torch.Tensor] = []
        self.held = 0  # tokens waiting
        self.selected: list[int] = []
        self.next_pos: int | None = None  # the text position the next block starts at (None: the first sink)


class Memory:
    """The memory of one stream. ``layers``: which layers keep one (those with the sink policy); ``num_sinks`` and
    ``window``: that policy's; ``inv_freqs``: every layer's rotary frequencies; ``token_bytes``: bytes of keys
    and values per token over the memory layers (to check the RAM budget before anything runs)."""

    def __init__(
        self,
        config: MemoryConfig,
        layers: Sequence[bool],
        num_sinks: int,
        window: int,
        inv_freqs: Sequence[torch.Tensor],
        token_bytes: int,
    ):
        self.config = config
        self.num_sinks, self.window = num_sinks, window
        self.inv_freqs = list(inv_freqs)
        self.layers = {i: _LayerMemory() for i, on in enumerate(layers) if on}
        block = token_bytes * config.block_size
        self.budget = config.ram_mb * 2**20
        if block > self.budget:
            raise ValueError(
                f"memory RAM budget of {config.ram_mb} MiB is smaller than one block "
                f"({block / 2**20:.1f} MiB: {config.block_size} tokens); raise --memory-ram or lower --memory-block"
            )
        self.ram: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.disk: dict[tuple[int, int], tuple[int, torch.Size, torch.dtype]] = {}
        self.ram_bytes = 0  # keys and values of the blocks in RAM
        self.rep_bytes = 0  # representative keys (always in RAM)
        self.spill = _Spill(config.dir)
        self.marks: set[int] = set()  # positions where the caller asked for a selection
        self.recalled_len = 0  # M: recalled tokens every memory layer holds now
        self.selections = 0

    # -- what the cache asks -----------------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        """Blocks held per memory layer."""
        return min((m.count for m in self.layers.values()), default=0)

    def is_point(self, pos: int) -> bool:
        return pos % self.config.refresh == 0 or pos in self.marks

    def next_point(self, after: int) -> int:
        """The first selection point strictly after ``after``."""
        step = self.config.refresh
        regular = (after // step + 1) * step
        marked = [p for p in self.marks if p > after]
        return min([regular, *marked])

    def recall_at(self, pos: int) -> None:
        """Make text position ``pos`` a selection point (the last token of a prompt, say)."""
        self.marks.add(int(pos))

    def start(self, pos: int) -> tuple[bool, int]:
        """Tokens from ``pos`` on are being planned: whether ``pos`` selects, and M, the recalled length."""
        self.marks = {p for p in self.marks if p >= pos}
        if self.is_point(pos):
            self.recalled_len = min(self.config.blocks, self.blocks) * self.config.block_size
            return self.recalled_len > 0, self.recalled_len
        return False, self.recalled_len

    # -- keeping -----------------------------------------------------------------------------------------------
    def add(self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offset: int):
        """Tokens that left ``layer``: text positions (N,), keys rotated at position - offset and values
        (1, Hkv, N, D). They wait as they are (decoding adds one token per layer per step, so this does no work
        per token); once a block is complete its keys are turned back before rotary, in one rotation, and kept."""
        mem = self.layers.get(layer)
        if mem is None:
            return
        if keys.shape[0] != 1:
            raise ValueError("memory keeps one stream per cache (batch 1)")
        mem.pending_pos.append(positions)
        mem.pending_keys.append(keys)
        mem.pending_values.append(values)
        mem.pending_offsets.append(torch.full_like(positions, offset))
        mem.held += positions.numel()
        bs = self.config.block_size
        if mem.held < bs:
            return
        pos, order = torch.cat(mem.pending_pos).sort()
        offsets = torch.cat(mem.pending_offsets)[order]
        on = order.to(keys.device)
        k, v = torch.cat(mem.pending_keys, dim=2)[:, :, on], torch.cat(mem.pending_values, dim=2)[:, :, on]
        if int(pos[0]) < self.num_sinks:
            raise ValueError("a sink left the cache; memory needs the sink policy")
        whole = mem.held // bs * bs
        delta = -(pos[:whole] - offsets[:whole])  # back to position 0: before rotary
        pre = rotate(k[:, :, :whole], delta, self.inv_freqs[layer])
        for start in range(0, whole, bs):
            block_pos = pos[start : start + bs]
            expected = self.num_sinks if mem.next_pos is None else mem.next_pos
            if int(block_pos[0]) != expected or int(block_pos[-1]) != expected + bs - 1:
                raise RuntimeError(f"memory of layer {layer}: the next block is not tokens {expected}..")
            mem.next_pos = expected + bs
            self.keep_block(layer, pre[:, :, start : start + bs], v[:, :, start : start + bs])
        mem.pending_pos, mem.pending_offsets = [pos[whole:]], [offsets[whole:]]
        mem.pending_keys, mem.pending_values = [k[:, :, whole:]], [v[:, :, whole:]]
        mem.held -= whole

    def keep_block(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep one whole block of ``layer`` as its next block: keys before rotary and values (1, Hkv, bs, D).
        ``add`` calls it for every block its tokens complete (a benchmark may call it to fill a memory)."""
        mem = self.layers[layer]
        r = self.config.reps
        k = keys[0].float()  # (Hkv, bs, D)
        spread = (k - k.mean(dim=1, keepdim=True)).norm(dim=-1)  # (Hkv, bs)
        pick = spread.sort(dim=-1, descending=True, stable=True).indices[:, :r]  # (Hkv, r)
        reps = torch.gather(keys[0], 1, pick[..., None].expand(-1, -1, k.shape[-1]))  # (Hkv, r, D)
        if mem.reps is None or mem.count == mem.reps.shape[0]:  # grow by an eighth: little held in reserve
            grown = reps.new_zeros((mem.count + max(16, mem.count // 8), *reps.shape))
            if mem.reps is not None:
                grown[: mem.count] = mem.reps[: mem.count]
                self.rep_bytes -= mem.reps.nbytes
            mem.reps = grown
            self.rep_bytes += grown.nbytes  # what is allocated counts, not only what is used
        mem.reps[mem.count] = reps
        key = (layer, mem.count)
        self.ram[key] = (keys.clone(), values.clone())
        self.ram_bytes += keys.nbytes + values.nbytes
        mem.count += 1
        while self.ram_bytes + self.rep_bytes > self.budget:  # representative keys count too, and stay
            if not self.ram:
                raise ValueError(
                    f"the memory's representative keys alone ({self.rep_bytes / 2**20:.0f} MiB) fill its RAM "
                    f"budget of {self.config.ram_mb} MiB; raise --memory-ram, or --memory-block"
                )
            self._move_out()

    def _move_out(self) -> None:
        """Move the oldest block in RAM to the file."""
        key, (k, v) = self.ram.popitem(last=False)
        both = torch.stack([k, v]).contiguous()  # (2, 1, Hkv, bs, D)
        offset = self.spill.write(both.view(torch.uint8).numpy().tobytes())
        self.disk[key] = (offset, both.shape, both.dtype)
        self.ram_bytes -= k.nbytes + v.nbytes

    def _load(self, layer: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, block)
        if key in self.ram:
            return self.ram[key]
        offset, shape, dtype = self.disk[key]
        n = shape.numel() * torch.empty(0, dtype=dtype).element_size()
        both = torch.frombuffer(bytearray(self.spill.read(offset, n)), dtype=dtype).view(shape)
        return both[0], both[1]

    # -- recalling ---------------------------------------------------------------------------------------------
    def select(
        self, layer: int, query: torch.Tensor, model_pos: int, anchor: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Select layer ``layer``'s blocks with ``query`` (1, H, D), rotated at ``model_pos``. -> the recalled keys,
        rotated where the query sees them from ``anchor`` (its in-cache position), and values (1, Hkv, M, D)."""
        mem = self.layers[layer]
        cfg = self.config
        inv_freq = self.inv_freqs[layer]
        n = self.recalled_len // cfg.block_size  # the same for every layer, fixed when the token was planned
        Hkv, D = mem.reps.shape[1], mem.reps.shape[3]
        shift = torch.tensor([self.window + 1 - model_pos])  # to distance window + 1 from a key at 0
        q = rotate(query.float()[0, :, None], shift, inv_freq)[:, 0]  # (H, D)
        q = q.view(Hkv, -1, D)  # (Hkv, G, D)
        reps = mem.reps[: mem.count].float()  # (Nb, Hkv, r, D)
        scores = torch.einsum("kgd,nkrd->nkgr", q, reps).amax(-1).sum((1, 2))  # (Nb,)
        best = scores.sort(descending=True, stable=True).indices[:n].sort().values.tolist()
        mem.selected = best
        parts = [self._load(layer, b) for b in best]
        keys = torch.cat([k for k, _ in parts], dim=2)  # (1, Hkv, M, D) before rotary
        values = torch.cat([v for _, v in parts], dim=2)
        M = keys.shape[2]
        S = self.num_sinks
        if cfg.positions == "cache":
            at = torch.arange(S, S + M)
        else:
            at = torch.full((M,), anchor - self.window - 1)
        self.selections += 1
        return rotate(keys, at, inv_freq), values

    def due(self, pos: int) -> bool:
        """Whether token ``pos`` selects (a selection point with blocks to select from)."""
        return self.is_point(pos) and self.blocks > 0

    def extra_anchor(self) -> int:
        """How far the recalled tokens move the query's anchor: M under ``cache`` positions, 0 under ``fixed``."""
        return self.recalled_len if self.config.positions == "cache" else 0

    # -- reporting ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "blocks": self.blocks,
            "tokens": self.blocks * self.config.block_size,
            "layer_blocks_in_ram": len(self.ram),  # one layer's block each
            "layer_blocks_on_disk": len(self.disk),
            "ram_bytes": self.ram_bytes + self.rep_bytes,
            "disk_bytes": self.spill.size,  # the file holds blocks only, each written once
            "recalled": self.recalled_len,
            "selections": self.selections,
        }

    def close(self) -> None:
        self.spill.close()
