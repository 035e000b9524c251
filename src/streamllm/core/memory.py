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
  heads. With ``select="content"`` or ``"hybrid"`` the blocks are also scored by the tokens they share with the
  query tokens the caller gave with its latest mark at or before the point (``textindex.py``, BM25): the few
  blocks that together hold what the query says and what surrounds them; or content proposing candidates and
  attention choosing among them (``selection.py``). The ``blocks`` chosen (ties: the older block) are
  recalled, in text order, until the next selection point.
  Selection points depend only on positions, and a chunk never spans one (``KVCache.plan`` refuses it,
  ``hf.forward`` splits there), so a chunk selects exactly what token-by-token processing selects.
- **Positions.** The query sees recalled keys like the sinks, from its anchor position: ``cache`` places block j
  of the selection at in-cache positions S + j*block_size ..., between the sinks and the window, and the anchor
  moves up by the recalled length (everything the query sees sits at in-cache positions, as in the paper);
  ``fixed`` places every recalled token at distance ``window + 1`` from the query.
- **Where blocks live** (``blockstore.py``). Keys and values of blocks stay in RAM up to ``ram_mb``; past it the
  oldest ones move to a file (``dir``; unlinked once open, so it goes when the stream does) and are read back
  when recalled. Representative keys always stay in RAM and count in the budget.
- **Saving.** A memory made with a named ``file`` (a server session's) can ``persist``: every block the file
  lacks is appended to it, and ``state_dict`` then names the file's id and length. A fresh memory restores from
  that (``load_state_dict``), reading only representative keys; the memory the state was taken from rolls back
  to it instead (a turn undone). A block already in the named file leaves RAM without another write.

Letters: Hkv kv heads, G query heads per kv head, D head dim, N tokens, Nb blocks, r representative keys, M
recalled tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .blockfile import HEADER, MemoryFileError
from .blockstore import BlockStore
from .rotary import rotate
from .selection import CLOSE, choose, uses_attention
from .textindex import TextIndex, overlap_for, query_terms

if TYPE_CHECKING:  # the configuration is made outside core; memory only reads it
    from ..config import MemoryConfig

QUERY_TOKENS = 512  # the most query tokens a mark keeps (the end of what was fed, when no query is given)


class _LayerMemory:
    """One layer's blocks: representative keys (Hkv, Nb * r, D), the pending tokens of the block being filled,
    and the blocks selected last."""

    def __init__(self) -> None:
        # (Hkv, capacity * r, D): block b's representative keys are columns b*r .. b*r + r - 1, so that one
        # batched product per kv head scores every block
        self.reps: torch.Tensor | None = None
        self.count = 0
        self.pending_pos: list[torch.Tensor] = []
        self.pending_keys: list[torch.Tensor] = []  # (1, Hkv, n, D) as stored: rotated at position - offset
        self.pending_values: list[torch.Tensor] = []
        # (n,) the rebasing offset each waiting key was rotated at
        self.pending_offsets: list[torch.Tensor] = []
        self.held = 0  # tokens waiting
        self.selected: list[int] = []
        self.at = 0  # under ``fixed`` positions: where the selected keys were rotated to
        self.next_pos: int | None = None  # the text position the next block starts at (None: the first sink)


class Memory:
    """The memory of one stream. ``layers``: which layers keep one (those with the sink policy); ``num_sinks`` and
    ``window``: that policy's; ``inv_freqs``: every layer's rotary frequencies; ``kv_heads``, ``head_dim`` and
    ``itemsize``: the shape of a token's keys (to check the RAM budget before anything runs). ``file``: the named
    file ``persist`` saves blocks to, so the memory can be restored with its stream (a server session's)."""

    def __init__(
        self,
        config: MemoryConfig,
        layers: Sequence[bool],
        num_sinks: int,
        window: int,
        inv_freqs: Sequence[torch.Tensor],
        kv_heads: int,
        head_dim: int,
        itemsize: int,
        file: Path | None = None,
    ):
        self.config = config
        self.num_sinks, self.window = num_sinks, window
        self.inv_freqs = list(inv_freqs)
        self.layers = {i: _LayerMemory() for i, on in enumerate(layers) if on}
        self.kv_heads, self.head_dim = kv_heads, head_dim
        block = len(self.layers) * 2 * kv_heads * head_dim * itemsize * config.block_size
        if block > config.ram_mb * 2**20:
            raise ValueError(
                f"memory RAM budget of {config.ram_mb} MiB is smaller than one block "
                f"({block / 2**20:.1f} MiB: {config.block_size} tokens); raise --memory-ram or lower --memory-block"
            )
        self.file = Path(file) if file is not None else None
        self.kept = BlockStore(
            config.ram_mb * 2**20, self.layers, config.dir, self.file, layout=self._layout, reps=self._reps
        )
        self.marks: set[int] = set()  # positions where the caller asked for a selection
        self.queries: dict[int, list[int]] = {}  # mark -> the query tokens the caller gave with it
        self.text = TextIndex(config.block_size, num_sinks, overlap_for(config.block_size, window))
        # at the current selection: the blocks' content scores (Nb,), and the seed blocks (content)
        self.content: np.ndarray | None = None
        self.seeds: list[int] | None = None
        self.forced: list[int] = []  # blocks every selection takes first (``force``)
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

    def recall_at(self, pos: int, query: Sequence[int] | None = None) -> None:
        """Make text position ``pos`` a selection point (the last token of a prompt, say). ``query``: the tokens
        that say what to recall (a question, a user's message), for content selection from ``pos`` until the
        next mark that brings its own."""
        self.marks.add(int(pos))
        if query is not None:
            self.queries[int(pos)] = [int(i) for i in query][-QUERY_TOKENS:]

    def force(self, blocks: Sequence[int]) -> None:
        """Selections take these blocks first, until ``force([])`` (an experiment's ceiling: the block that
        holds the answer, recalled whatever the scores say)."""
        self.forced = [int(b) for b in blocks]

    def note(self, pos: int, ids: Sequence[int]) -> None:
        """The stream is about to process tokens ``ids`` at text positions ``pos``...: what the blocks will hold."""
        self.text.note(pos, ids)

    def start(self, pos: int) -> tuple[bool, int]:
        """Tokens from ``pos`` on are being planned: whether ``pos`` selects, and M, the recalled length."""
        self.marks = {p for p in self.marks if p >= pos}
        current = max((p for p in self.queries if p <= pos), default=None)
        self.queries = {p: q for p, q in self.queries.items() if current is None or p >= current}
        if self.is_point(pos):
            self.recalled_len = min(self.config.blocks, self.blocks) * self.config.block_size
            self.content = self.seeds = None
            if self.config.select != "attention" and current is not None and self.recalled_len:
                self.text.sync(self.blocks)
                q = self._query_terms(current)
                self.content = self.text.scores(q)
                if self.config.select == "content":
                    self.seeds = self.text.seeds(q, self.recalled_len // self.config.block_size, CLOSE)
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
        if self.kept.dtype is None:
            self.kept.dtype = keys.dtype
        elif keys.dtype != self.kept.dtype:
            raise MemoryFileError(
                f"this memory holds {self.kept.dtype} keys; a block of {keys.dtype} keys came"
            )
        r = self.config.reps
        k = keys[0].float()  # (Hkv, bs, D)
        spread = (k - k.mean(dim=1, keepdim=True)).norm(dim=-1)  # (Hkv, bs)
        pick = spread.sort(dim=-1, descending=True, stable=True).indices[:, :r]  # (Hkv, r)
        reps = torch.gather(keys[0], 1, pick[..., None].expand(-1, -1, k.shape[-1]))  # (Hkv, r, D)
        self._put_reps(mem, mem.count, reps)
        mem.count += 1
        self.kept.put(layer, mem.count - 1, keys, values)

    def _put_reps(self, mem: _LayerMemory, block: int, reps: torch.Tensor) -> None:
        """Store block ``block``'s representative keys (Hkv, r, D); the storage grows by an eighth when full
        (little held in reserve)."""
        r = self.config.reps
        if mem.reps is None or (block + 1) * r > mem.reps.shape[1]:
            blocks = block + max(16, (block + 1) // 8)
            grown = reps.new_zeros((reps.shape[0], blocks * r, reps.shape[2]))
            if mem.reps is not None:
                grown[:, : block * r] = mem.reps[:, : block * r]
                self.kept.rep_bytes -= mem.reps.nbytes
            mem.reps = grown
            self.kept.rep_bytes += grown.nbytes  # what is allocated counts, not only what is used
        mem.reps[:, block * r : (block + 1) * r] = reps

    def _reps(self, layer: int, block: int) -> torch.Tensor:
        r = self.config.reps
        stored = self.layers[layer].reps
        assert stored is not None, "a kept block has its representative keys"
        return stored[:, block * r : (block + 1) * r]

    def _layout(self) -> dict:
        cfg = self.config
        return {
            "version": 1,
            "layers": sorted(self.layers),
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "block_size": cfg.block_size,
            "reps": cfg.reps,
            "dtype": str(self.kept.dtype).removeprefix("torch."),
        }

    def _shape(self) -> tuple[int, ...]:
        return (1, self.kv_heads, self.config.block_size, self.head_dim)

    # -- recalling ---------------------------------------------------------------------------------------------
    def select(
        self, layer: int, query: torch.Tensor, model_pos: int, anchor: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Select layer ``layer``'s blocks with ``query`` (1, H, D), rotated at ``model_pos``. -> the recalled keys,
        rotated where the query sees them from ``anchor`` (its in-cache position), and values (1, Hkv, M, D)."""
        mem = self.layers[layer]
        # The number of blocks is the same for every layer, fixed when the token was planned.
        n = self.recalled_len // self.config.block_size
        cfg = self.config
        if uses_attention(cfg.select, self.seeds):
            scores = self._attention_scores(layer, query, model_pos)
        else:
            scores = np.zeros(mem.count)
        mem.selected = choose(scores, n, cfg.select, cfg.neighbours, self.content, self.seeds, self.forced)
        mem.at = anchor - self.window - 1
        self.selections += 1
        return self.recalled(layer)

    def _attention_scores(self, layer: int, query: torch.Tensor, model_pos: int) -> np.ndarray:
        """Every block's score for ``query`` (1, H, D): per query head the best logit of its representative keys
        at distance ``window + 1``, summed over the heads. -> (Nb,)"""
        mem = self.layers[layer]
        stored = mem.reps
        assert stored is not None, "recall runs once a block is kept"
        Hkv, D, r = stored.shape[0], stored.shape[2], self.config.reps
        shift = torch.tensor([self.window + 1 - model_pos])  # to distance window + 1 from a key at 0
        q = rotate(query.float()[0, :, None], shift, self.inv_freqs[layer])[:, 0]  # (H, D)
        q = q.view(Hkv, -1, D)  # (Hkv, G, D)
        reps = stored[:, : mem.count * r].float()  # (Hkv, Nb * r, D)
        logits = torch.bmm(reps, q.transpose(1, 2))  # (Hkv, Nb * r, G)
        return logits.view(Hkv, mem.count, r, -1).amax(2).sum((0, 2)).numpy()  # (Nb,)

    def _query_terms(self, mark: int) -> np.ndarray:
        """The terms of the query marked at ``mark`` that the ``window`` tokens up to it hold no more often than
        the query does (``textindex.query_terms``)."""
        view = self.text.tokens.view()[max(mark + 1 - self.window, 0) : mark + 1]
        return query_terms(self.queries[mark], view)

    def recalled(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (1, Hkv, M, D) of ``layer``'s selected blocks, keys rotated where the query sees
        them (``select`` returns them; a restored stream rebuilds its recall slots with them)."""
        mem = self.layers[layer]
        parts = [self.kept.load(layer, b, self._shape()) for b in mem.selected]
        keys = torch.cat([k for k, _ in parts], dim=2)  # (1, Hkv, M, D) before rotary
        values = torch.cat([v for _, v in parts], dim=2)
        M = keys.shape[2]
        S = self.num_sinks
        at = torch.arange(S, S + M) if self.config.positions == "cache" else torch.full((M,), mem.at)
        return rotate(keys, at, self.inv_freqs[layer]), values

    def due(self, pos: int) -> bool:
        """Whether token ``pos`` selects (a selection point with blocks to select from)."""
        return self.is_point(pos) and self.blocks > 0

    def extra_anchor(self) -> int:
        """How far the recalled tokens move the query's anchor: M under ``cache`` positions, 0 under ``fixed``."""
        return self.recalled_len if self.config.positions == "cache" else 0

    # -- saving and restoring ---------------------------------------------------------------------------------
    def persist(self) -> None:
        """Append every block the named file lacks to it, then sync: with ``state_dict`` taken after, the memory
        can be restored from that file. Raises ``MemoryFileError``; then the file counts as it was before."""
        if self.file is None:
            raise RuntimeError("this memory has no named file to persist to")
        saved = self.kept.saved
        todo = [(layer, b) for layer, mem in self.layers.items() for b in range(len(saved[layer]), mem.count)]
        if todo:
            self.kept.persist(todo, self._shape())

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(counters, which can go to JSON; the blocks being filled, as tensors copied to the CPU). Blocks are
        not in it: they stay where they are (``load_state_dict`` rolls this memory back to the state), and the
        named file holds the ones ``persist`` wrote (a fresh memory restores from it)."""
        store = self.kept.store
        info: dict = {
            "dtype": None if self.kept.dtype is None else str(self.kept.dtype).removeprefix("torch."),
            "file": None if store is None else store.id,
            "file_bytes": 0 if store is None else store.size,
            "marks": sorted(self.marks),
            "queries": {str(p): q for p, q in self.queries.items()},
            "recalled": self.recalled_len,
            "selections": self.selections,
            "layers": {},
        }
        tensors = {}
        for i, mem in self.layers.items():
            info["layers"][str(i)] = {
                "count": mem.count,
                "selected": list(mem.selected),
                "at": mem.at,
                "next_pos": mem.next_pos,
            }
            if mem.held:
                for name in ("pos", "keys", "values", "offsets"):
                    part = torch.cat(
                        getattr(mem, f"pending_{name}"), dim=2 if name in ("keys", "values") else 0
                    )
                    tensors[f"{i}.{name}"] = part.detach().to("cpu", copy=True).contiguous()
        tensors["tokens"] = torch.from_numpy(self.text.tokens.view().copy())
        return info, tensors

    def load_state_dict(self, info: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Go back to what ``state_dict`` returned: this memory drops the blocks kept since (a turn undone), or,
        when it is fresh, reads the representative keys of the blocks from the named file (a stream restored)."""
        if set(info["layers"]) != {str(i) for i in self.layers}:
            raise ValueError(
                f"memory of layers {sorted(info['layers'])}; this model keeps {sorted(self.layers)}"
            )
        counts = {i: int(info["layers"][str(i)]["count"]) for i in self.layers}
        if self.blocks == 0 and any(counts.values()):
            self._restore(info, counts)
        for i, mem in self.layers.items():
            saved = info["layers"][str(i)]
            if mem.count < counts[i]:
                raise ValueError(f"memory of layer {i} holds {mem.count} blocks, the state {counts[i]}")
            self.kept.drop(i, counts[i])  # the blocks kept after the state was taken
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
        self.marks = {int(p) for p in info["marks"]}
        self.queries = {int(p): [int(i) for i in q] for p, q in info.get("queries", {}).items()}
        self.recalled_len, self.selections = int(info["recalled"]), int(info["selections"])
        # A session saved before blocks were indexed by their tokens has none: its blocks get no terms.
        self.text.cut(min(counts.values(), default=0))
        self.text.note(0, tensors["tokens"].tolist() if "tokens" in tensors else [])

    def _restore(self, info: dict, counts: dict[int, int]) -> None:
        """Index the named file a saved state refers to: every record's place, and its representative keys."""
        if self.file is None or info["file"] is None:
            raise MemoryFileError("the saved state has memory blocks, but no memory file to read them from")
        self.kept.dtype = getattr(torch, info["dtype"])
        store = self.kept.open_named(info["file"], int(info["file_bytes"]))
        shape = (self.kv_heads, self.config.reps, self.head_dim)
        for offset in range(HEADER, store.size, store.record):
            layer, block, raw = store.read_reps(offset)
            mem = self.layers.get(layer)
            if mem is None or block != len(self.kept.saved[layer]) or block >= counts[layer]:
                raise MemoryFileError(f"memory file corrupted: an unexpected record at offset {offset}")
            reps = torch.frombuffer(bytearray(raw), dtype=self.kept.dtype).view(shape)
            self._put_reps(mem, block, reps)
            self.kept.saved[layer].append(offset)
            mem.count = block + 1
        for i, mem in self.layers.items():
            if mem.count != counts[i]:
                raise MemoryFileError(f"the memory file holds {mem.count} of layer {i}'s {counts[i]} blocks")
        self.kept.fit()

    # -- reporting ---------------------------------------------------------------------------------------------
    def recalls(self) -> list[dict]:
        """What the latest selection recalled, for people to read: one entry per block any memory layer holds
        now, in text order, with its text positions (``start`` .. ``end`` - 1), the share of memory layers that
        chose it and its token ids (empty where the tokens were never noted)."""
        chosen: dict[int, int] = {}
        for mem in self.layers.values():
            for b in mem.selected:
                chosen[b] = chosen.get(b, 0) + 1
        bs, out = self.config.block_size, []
        for b in sorted(chosen):
            start = self.num_sinks + b * bs
            tokens = self.text.block_tokens(b).tolist()
            out.append(
                {
                    "block": b,
                    "start": start,
                    "end": start + bs,
                    "layers": round(chosen[b] / len(self.layers), 3),
                    "tokens": tokens,
                }
            )
        return out

    def stats(self) -> dict:
        return {
            "blocks": self.blocks,
            "tokens": self.blocks * self.config.block_size,
            **self.kept.stats(),
            "recalled": self.recalled_len,
            "selections": self.selections,
            "text_index_bytes": self.text.nbytes(),
        }

    def close(self) -> None:
        self.kept.close()
