"""What a decoded token reads instead of computing: its rotary angles and the sinks' turn, kept in blocks.

Decoding asks for the next position (and the next shift of the sinks) every token. Computing either is a few small
torch operations, which cost 10-45 us each when they run cold between two native steps (``docs/design.md``,
"Steady tokens"); reading a row of a block made once costs one.

Letters: R rotary dims (<= head dim D), N integers of a block.
"""

from __future__ import annotations

import torch
from torch import nn


class Blocks:
    """Rows ``f(n)`` for integers n, made ``BLOCK`` at a time when first asked for and kept, for n in [lo, hi);
    outside that range computed each time. ``f`` maps a (N,) tensor of integers to a tensor (N, ...). Decoding asks
    for the next integer every token, so a token reads a row instead of running a few small operations."""

    BLOCK = 256

    def __init__(self, f, lo: int, hi: int):
        self.f, self.lo, self.hi = f, lo, hi
        self.blocks: dict[int, torch.Tensor] = {}

    def __call__(self, n: int) -> torch.Tensor:
        if not self.lo <= n < self.hi:
            return self.f(torch.tensor([n]))[0]
        b, i = divmod(n - self.lo, self.BLOCK)
        block = self.blocks.get(b)
        if block is None:
            start = self.lo + b * self.BLOCK
            block = self.blocks[b] = self.f(torch.arange(start, start + self.BLOCK))
        return block[i]


class RotaryRows:
    """The model's rotary cos and sin at one position, from the model's own rotary module, computed for blocks of
    positions (the same elementwise arithmetic, so the same numbers) below ``LIMIT``. Rotaries whose frequencies
    depend on the longest position of a call ("dynamic", "longrope") are called for each position alone."""

    LIMIT = 1 << 14  # positions kept: the window plus the rebasing margin, under 2 MB for a head dim of 64

    def __init__(self, rotary: nn.Module, dtype: torch.dtype):
        self.rotary = rotary
        kind = getattr(rotary, "rope_type", "default")
        static = isinstance(kind, str) and "dynamic" not in kind and kind != "longrope"
        self.like = torch.zeros(1, dtype=dtype)
        self.rows = Blocks(self._make, 0, self.LIMIT if static else 0)

    def _make(self, pos: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(self.like, pos[None])  # (1, N, R) each
        return torch.stack([cos[0], sin[0]], dim=1)  # (N, 2, R)

    def __call__(self, pos: int, stacked: bool = False):
        """-> (cos, sin), (R,) each; with ``stacked`` one tensor (2, R)"""
        row = self.rows(pos)
        return row if stacked else (row[0], row[1])


class RotaryTurns:
    """The rotary rotation by ``shift`` positions as the values (2R,) float32 cos, cos, -sin, sin of its R/2
    angles, float64 until then as ``rotary.shift_angles`` computes them: the rotation M (D, D) with cos on the
    diagonal of the first R dims, -sin at (j + R/2, j) and sin at (j, j + R/2), so that ``x @ M`` equals
    ``rotary.rotate(x, shift)``. The native step turns the query by its transpose (``turn_query``). A ring's token
    asks for the next shift every token: the values of -``LIMIT``..0 are kept (``Blocks``)."""

    LIMIT = 1 << 13

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.to(torch.float64)  # (R/2,)
        self.values = Blocks(self._values, -self.LIMIT, 1)

    def _values(self, shifts: torch.Tensor) -> torch.Tensor:
        angles = shifts[:, None] * self.inv_freq  # (N, R/2)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos, -sin, sin], dim=1).float()  # (N, 2R)

    def __call__(self, shift: int) -> torch.Tensor:
        return self.values(shift)
