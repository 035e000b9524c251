"""Which blocks a memory layer recalls at a selection point, from its scores (``docs/design.md``, "Memory").

Pure index math over the Nb blocks held: ``attention`` (this layer's query against each block's representative
keys), and from the text index, the same in every layer, ``content`` (BM25 of the query's tokens against each
block's) and ``seeds`` (the few blocks that together cover what the query says: ``TextIndex.seeds``); both None
where the caller gave no query. Ties always go to the older block.

- ``attention``: the best ``n`` by attention, each bringing its ``neighbours`` next blocks.
- ``content``: the seeds, each with its ``neighbours`` next blocks; the slots left go to the blocks around the
  seeds, nearest first (what was said just before and after), and only then to attention. Look-alikes of a
  seed (another door's pass key, another line of the register: a block whose content score is at least
  ``CLOSE`` times the first seed's, not next to a seed) are never seeds, and they fill a slot only when no
  other block is left, so they are not recalled beside the answer for a small model to copy instead.
- ``hybrid``: content proposes ``4 n`` candidates (those with any content score), attention chooses among
  them, each bringing its neighbours; attention fills what is left.
- ``forced`` blocks (an experiment's ceiling) come first under every rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain

import numpy as np

# A further seed must add at least this share of the first seed's score in query terms of its own.
CLOSE = 0.5


def choose(
    attention: np.ndarray,
    n: int,
    rule: str,
    neighbours: int,
    content: np.ndarray | None = None,
    seeds: Sequence[int] | None = None,
    forced: Sequence[int] = (),
) -> list[int]:
    """The ``n`` blocks to recall, ascending. ``content``: every block's content score (Nb,), under ``content``
    the score that tells a seed's look-alikes."""
    count = attention.size
    first = [b for b in forced if b < count]
    if rule == "content" and seeds:
        seeds = list(seeds)
        # The blocks just before and after a seed's span share its text across the boundary (the index reads
        # on into the next block): the rest of the same line, never a look-alike.
        touching = {j for b in seeds for j in range(b - 1, b + neighbours + 2)}
        alike = (
            set()
            if content is None
            else set(np.flatnonzero(content >= CLOSE * content[seeds[0]]).tolist()) - touching
        )
        # lazily: a few are taken of the Nb (a million tokens of memory: 8,000 blocks, in every layer)
        near = (b for b in chain(_around(seeds, neighbours, count), _ranked(attention)) if b not in alike)
        order = chain(first, _with_next(seeds, neighbours, count), near, sorted(alike))
    elif rule != "hybrid" or content is None or not content.any():
        order = chain(first, _with_next(_ranked(attention), neighbours, count))
    else:
        proposed = np.lexsort((np.arange(count), -attention, -content))[: 4 * n]
        proposed = proposed[content[proposed] > 0]
        chosen = proposed[np.lexsort((proposed, -attention[proposed]))].tolist()
        order = chain(
            first, _with_next(chosen, neighbours, count), _with_next(_ranked(attention), neighbours, count)
        )
    picked: dict[int, None] = {}
    for b in order:
        picked.setdefault(b)
        if len(picked) == n:
            break
    return sorted(picked)


def uses_attention(rule: str, seeds: Sequence[int] | None) -> bool:
    """Whether ``choose`` reads the attention scores: not under ``content`` with seeds, where the seeds, the blocks
    around them and then the look-alikes fill every slot (the caller may pass zeros and skip scoring)."""
    return not (rule == "content" and seeds)


def _ranked(attention: np.ndarray) -> Iterator[int]:
    """The blocks by attention score, best first (ties: the older block), sorted only when first asked for."""
    yield from np.lexsort((np.arange(attention.size), -attention)).tolist()


def _with_next(blocks: Iterable[int], neighbours: int, count: int) -> Iterator[int]:
    return (j for b in blocks for j in range(b, min(b + 1 + neighbours, count)))


def _around(seeds: list[int], neighbours: int, count: int) -> Iterator[int]:
    """The blocks around the seeds, nearest first: one before each seed, one past its neighbours, and on out."""
    for d in range(1, count):
        for s in seeds:
            for j in (s - d, s + neighbours + d):
                if 0 <= j < count:
                    yield j
