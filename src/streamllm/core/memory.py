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
- **Saving** (``memorystate.py``). A memory made with a named ``file`` (a server session's) can ``persist`` its
  blocks there and be restored from that file with its stream.

Letters: Hkv kv heads, G query heads per kv head, D head dim, N tokens, Nb blocks, r representative keys, M
recalled tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import memorystate
from .blockfile import MemoryFileError
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
        self.put_reps(mem, mem.count, reps)
        mem.count += 1
        self.kept.put(layer, mem.count - 1, keys, values)

    def put_reps(self, mem: _LayerMemory, block: int, reps: torch.Tensor) -> None:
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

    def block_shape(self) -> tuple[int, ...]:
        """One block's keys or values: (1, Hkv, block_size, D)."""
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
        parts = [self.kept.load(layer, b, self.block_shape()) for b in mem.selected]
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

    # -- saving and restoring (``memorystate.py``) ----------------------------------------------------------------
    def persist(self) -> None:
        """Append every block the named file lacks to it, then sync (``memorystate.persist``)."""
        memorystate.persist(self)

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(counters, the blocks being filled): what ``load_state_dict`` goes back to (``memorystate.state``)."""
        return memorystate.state(self)

    def load_state_dict(self, info: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Go back to what ``state_dict`` returned (``memorystate.load``)."""
        memorystate.load(self, info, tensors)

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
