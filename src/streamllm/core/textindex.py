"""``TextIndex``: which evicted blocks say what a query says, by the tokens they hold.

Attention scores find a block that stands out (a pass key in filler), but not one line among look-alikes: the
models' queries do not single it out. The tokens do. Every layer's memory holds the same tokens in the same
blocks, so one index serves a whole stream.

- **Terms.** Token n-grams of length 1 to 3 inside a block and the first ``overlap`` tokens of the next one,
  each coded exactly as one int64: the ids plus one, 21 bits each (so a vocabulary of up to 2^21 - 1 tokens),
  shorter n-grams below longer ones. The overlap is for what a block boundary cuts: "the pass key of door 1 is
  41039. Remember it. 410|39 is the pass key of door 1." is found whole in the block where it starts, instead
  of half in each, where a look-alike said whole in one block ("door 10 ...") would outscore both halves. The
  memory recalls the blocks around a chosen one, so the rest is read too. Every token of the overlap has been
  noted by the time a block is indexed (it has left the window, ``overlap`` <= window tokens later).
- **Weights (BM25).** A block's score for a query is the sum, over the query's distinct terms that the block
  holds, of ``idf(t) * tf * (k1 + 1) / (tf + k1)``, with ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))`` over
  the N blocks held. Text that recurs in most blocks (a chat template, filler, the shared part of look-alike
  lines) gets an idf near 0 and counts for little; a name, a number or "line 23" occurs in few blocks and counts
  for much. Blocks all have ``block_size`` tokens, so BM25's length normalisation has nothing to do (b = 0);
  k1 = 1.2 saturates a term repeated inside one block. Scores are rounded to 1e-9 so that a tie is a tie
  whatever order the sums were taken in.
- **Cost.** Per block, its distinct terms (sorted int64) and their counts (int32): about 3 terms a token, 36 bytes
  a token, plus the token ids themselves (4 bytes). Scoring a query reads only the blocks added since the same
  query was last scored (a reply keeps its question), so a selection costs O(new blocks), not O(all blocks).

Letters: N tokens, Nb blocks, Q distinct query terms, E index entries (terms of all blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BITS = 21
K1 = 1.2


def overlap_for(block_size: int, window: int) -> int:
    """How far a block's indexed text runs on into the next block: a quarter block (what a boundary cuts is a
    line or two), never more than the window (those tokens must have been noted when the block is indexed)."""
    return min(block_size // 4, window)


def terms(ids: np.ndarray) -> np.ndarray:
    """The n-gram codes (n = 1..3) of a run of token ids (N,) -> (<= 3N,) int64, in no particular order."""
    t = ids.astype(np.int64) + 1
    if t.size and int(t.max()) >= 1 << BITS:
        raise ValueError(f"token id {int(t.max()) - 1} too large for the text index (at most {2**BITS - 2})")
    uni = t
    bi = (t[:-1] << BITS) | t[1:]
    tri = (t[:-2] << (2 * BITS)) | (t[1:-1] << BITS) | t[2:]
    return np.concatenate([uni, bi, tri])


def query_terms(query: Sequence[int], context: Sequence[int] | np.ndarray = ()) -> np.ndarray:
    """The distinct terms of ``query`` (sorted int64) that ``context`` (the text in view, the query usually
    among it) does not hold more often than the query itself: what the query shares with the rest of what is in
    view (a chat template, a question's own boilerplate, words the window repeats) does not point back."""
    q, q_count = np.unique(terms(np.asarray(query, dtype=np.int64)), return_counts=True)
    if len(context) == 0 or q.size == 0:
        return q
    c, c_count = np.unique(terms(np.asarray(context, dtype=np.int64)), return_counts=True)
    at = np.searchsorted(c, q).clip(max=c.size - 1)
    seen = np.where(c[at] == q, c_count[at], 0)
    return q[seen <= q_count]


class _Grow:
    """A numpy array that grows by doubling: ``data[:n]`` holds what was appended."""

    def __init__(self, dtype):
        self.data = np.zeros(1024, dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + values.size
        if need > self.data.size:
            grown = np.zeros(max(need, 2 * self.data.size), dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : need] = values
        self.n = need

    def view(self) -> np.ndarray:
        return self.data[: self.n]

    def cut(self, n: int) -> None:
        self.n = min(self.n, n)


class TextIndex:
    """The tokens of one stream by text position, and a term index of its evicted blocks: block b holds the
    tokens ``first + b * block_size`` .. ``first + (b + 1) * block_size - 1`` (``first``: the number of sinks)."""

    def __init__(self, block_size: int, first: int, overlap: int = 0):
        self.block_size, self.first, self.overlap = block_size, first, overlap
        self.tokens = _Grow(np.int32)  # (N,) every token noted, by text position
        self.codes = _Grow(np.int64)  # (E,) each block's distinct terms, sorted, block after block
        self.counts = _Grow(np.int32)  # (E,) how often each occurs in its block
        self.starts = [0]  # block b's entries are codes[starts[b]:starts[b + 1]]
        self._match: tuple | None = None  # the last query's terms and its matches so far

    @property
    def blocks(self) -> int:
        return len(self.starts) - 1

    def note(self, pos: int, ids: Sequence[int]) -> None:
        """Tokens ``ids`` stand at text positions ``pos``... (a later note at an earlier position replaces what was
        noted from there: a feed that failed part way is fed again)."""
        if pos > self.tokens.n:
            raise ValueError(f"tokens noted from position {pos}, but only {self.tokens.n} are known")
        self.tokens.cut(pos)
        self.tokens.extend(np.asarray(ids, dtype=np.int32))

    def block_tokens(self, b: int) -> np.ndarray:
        start = self.first + b * self.block_size
        return self.tokens.view()[start : start + self.block_size]

    def sync(self, blocks: int) -> None:
        """Index blocks up to ``blocks`` (those the memory holds); a block whose tokens were never noted (a
        benchmark filling memory with made-up keys) gets no terms."""
        for b in range(self.blocks, blocks):
            start = self.first + b * self.block_size
            text = self.tokens.view()[start : start + self.block_size + self.overlap]
            codes, counts = np.unique(terms(text), return_counts=True)
            self.codes.extend(codes)
            self.counts.extend(counts.astype(np.int32))
            self.starts.append(self.codes.n)

    def cut(self, blocks: int) -> None:
        """Forget blocks from ``blocks`` on (a turn undone)."""
        if blocks < self.blocks:
            del self.starts[blocks + 1 :]
            self.codes.cut(self.starts[-1])
            self.counts.cut(self.starts[-1])
            self._match = None

    def scores(self, q: np.ndarray) -> np.ndarray:
        """BM25 of every indexed block for the distinct query terms ``q`` (Q,) sorted (``query_terms``) -> (Nb,)
        float64, rounded to 1e-9."""
        blocks, _, part = self._parts(q)
        return np.round(np.bincount(blocks, weights=part, minlength=self.blocks), 9)

    def seeds(self, q: np.ndarray, k: int, close: float) -> list[int]:
        """Up to ``k`` blocks that together say most of what the query says, greedily: each next one is the block
        with the best BM25 over the query terms that the blocks before it do not hold (ties: the older block),
        while that score is at least ``close`` times the first one's. A look-alike of the first block (another
        door's pass key, another register line) holds only terms the first one covers, and is left out."""
        blocks, which, part = self._parts(q)
        covered = np.zeros(q.size, dtype=bool)  # (Q,)
        chosen: list[int] = []
        first = 0.0
        for _ in range(k):
            gain = np.round(np.bincount(blocks, weights=part * ~covered[which], minlength=self.blocks), 9)
            gain[chosen] = 0.0
            best = int(np.argmax(gain)) if gain.size else 0
            if not gain.size or gain[best] <= 0 or gain[best] < close * first:
                break
            first = first or float(gain[best])
            chosen.append(best)
            covered[which[blocks == best]] = True
        return chosen

    def _parts(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (block, query term) match of the indexed blocks: the block (M,), the term's index in ``q`` (M,)
        and its BM25 part (M,). Only blocks added since ``q`` was last asked about are read."""
        n = self.blocks
        if q.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        entries = self.starts[-1]
        if self._match is None or not np.array_equal(self._match[0], q) or self._match[1] > entries:
            self._match = (q, 0, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))
        _, scanned, blocks, which, tf = self._match
        if scanned < entries:
            new = self.codes.data[scanned:entries]  # (E',)
            at = np.searchsorted(q, new).clip(max=q.size - 1)  # (E',)
            hit = np.flatnonzero(q[at] == new)
            starts = np.asarray(self.starts)
            blocks = np.concatenate([blocks, np.searchsorted(starts, scanned + hit, side="right") - 1])
            which = np.concatenate([which, at[hit]])
            tf = np.concatenate([tf, self.counts.data[scanned:entries][hit]])
            self._match = (q, entries, blocks, which, tf)
        df = np.bincount(which, minlength=q.size)  # (Q,) blocks holding each term
        idf = np.log1p((n - df + 0.5) / (df + 0.5))  # (Q,)
        return blocks, which, idf[which] * tf * (K1 + 1) / (tf + K1)

    def nbytes(self) -> int:
        return (
            self.tokens.data.nbytes + self.codes.data.nbytes + self.counts.data.nbytes + 8 * len(self.starts)
        )
