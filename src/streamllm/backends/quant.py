"""The matrix-vector products of the decode step: the model's own weights, or 4- and 8-bit copies of them.

Each class holds one weight matrix W (N, K) in some form and computes y = W x; ``KIND`` tells the native step
(``decode_kernels.cpp``) which product to run on the same ``tensors``.

Letters: N outputs, K inputs.
"""

from __future__ import annotations

import torch


class MatVec:
    """y = W x with the model's own weight (N, K), in the model's dtype."""

    KIND = 0  # how the native step (decode_kernels.cpp) multiplies by it

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # (N, K)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mv(self.weight, x)  # (N,)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, torch.empty(0)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class Int4MatVec:
    """y = W x with W held as 4-bit integers in groups of 32 inputs, each group with its own scale and minimum.

    That is the layout of GGUF's Q4_1, and also what Q4_0 and the sub-blocks of Q4_K come back as once dequantized:
    in every one of them each group of 32 weights sits on a grid ``low + q * step`` with q in 0..15. A group need
    not use the whole grid (Q4_K fits its scales per block of 256), so the grid is found per group by trying
    every count of steps between its lowest and highest weight, 15 down to 1, and keeping the one that fits best:
    such layers come back exactly up to the bfloat16 rounding of the scales. Reads a quarter of the bytes of
    bfloat16; torch's CPU int4 kernel takes bfloat16 inputs."""

    GROUP = 32  # decode_kernels.cpp assumes it too
    KIND = 1
    ROWS = 4096  # rows fitted at a time, which bounds the fit's scratch memory

    @classmethod
    def fits(cls, weight: torch.Tensor) -> bool:
        """The kernel's shape rules: inputs in whole groups, outputs in multiples of 16."""
        return weight.shape[1] % cls.GROUP == 0 and weight.shape[0] % 16 == 0

    def __init__(self, weight: torch.Tensor):
        N, K = weight.shape
        if not self.fits(weight):
            raise ValueError(
                f"int4 weights need outputs divisible by 16 and inputs by {self.GROUP}, got {N}x{K}"
            )
        w = weight.detach().float().view(N, K // self.GROUP, self.GROUP)  # (N, K/32, 32)
        fitted = [self._fit(w[r : r + self.ROWS]) for r in range(0, N, self.ROWS)]
        q, step, low = (torch.cat(parts) for parts in zip(*fitted, strict=True))
        self.error = self._error(w, q, step, low)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(N, K), 1)
        zero = low + 8 * step  # the kernel computes (q - 8) * scale + zero
        self.scale_zero = (
            torch.stack([step.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        )  # (K/32, N, 2)

    @classmethod
    def sample_error(cls, weight: torch.Tensor, rows: int = 256) -> float:
        """The fit's relative error on ``rows`` rows spread over ``weight``: a quick look before fitting it all."""
        pick = torch.linspace(0, weight.shape[0] - 1, min(rows, weight.shape[0])).long()
        w = weight[pick].detach().float().view(len(pick), -1, cls.GROUP)  # (rows, K/32, 32)
        return cls._error(w, *cls._fit(w))

    @staticmethod
    def _error(w: torch.Tensor, q: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> float:
        """Relative Frobenius error of the grid ``low + q * step`` against the groups ``w`` (n, G, 32)."""
        return float((q * step[..., None] + low[..., None] - w).norm() / w.norm().clamp(min=1e-12))

    @staticmethod
    def _fit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The 4-bit grid of each group of ``w`` (n, G, 32) -> (q (n, G, 32), step (n, G), low (n, G)).

        Groups that sit on the full 15-step grid (all of Q4_0 and Q4_1, most of Q4_K) are settled by the first
        try; only the others search the coarser grids."""
        low = w.amin(-1)  # (n, G)
        span = w.amax(-1) - low  # (n, G)
        levels = torch.full_like(low, 15.0)  # (n, G)
        err, step = Int4MatVec._grid_error(w, low, span, 15)  # (n, G) twice
        rest = (err > 0.1 * step).nonzero(as_tuple=True)  # groups off the full grid (beyond dtype rounding)
        if rest[0].numel():
            levels[rest] = Int4MatVec._search(w[rest], low[rest], span[rest])
        step = (span / levels).clamp(min=1e-12)  # (n, G)
        q = torch.round((w - low[..., None]) / step[..., None]).clamp(0, 15)  # (n, G, 32)
        return q, step, low

    @staticmethod
    def _grid_error(w, low, span, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The largest distance of each group's weights (..., 32) from the grid of ``levels`` steps, and its step."""
        step = (span / levels).clamp(min=1e-12)  # (...)
        q = torch.round((w - low[..., None]) / step[..., None]).clamp(0, levels)  # (..., 32)
        return (q * step[..., None] + low[..., None] - w).abs().amax(-1), step

    @staticmethod
    def _search(w, low, span) -> torch.Tensor:
        """For groups ``w`` (m, 32): the count of steps, 15 down to 1, whose grid fits best. -> (m,)"""
        best_err = torch.full_like(low, float("inf"))
        best_levels = torch.full_like(low, 15.0)
        for levels in range(15, 0, -1):
            err, _ = Int4MatVec._grid_error(w, low, span, levels)  # (m,)
            better = err < 0.5 * best_err  # a finer grid that fits as well is kept
            best_err = torch.where(better, err, best_err)
            best_levels = torch.where(better, float(levels), best_levels)
        return best_levels

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zero.nbytes

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.packed, self.scale_zero

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x16 = x.to(torch.bfloat16)[None]  # (1, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x16, self.packed, self.GROUP, self.scale_zero
        )  # (1, N)
        return y[0].to(x.dtype)  # (N,)


class Int8MatVec:
    """y = W x with W held as 8-bit integers, one scale per output row (torch's CPU int8 kernel)."""

    KIND = 2

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().float()  # (N, K)
        scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)  # (N,)
        self.q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
        self.scale = scale.to(torch.bfloat16)  # (N,)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q, self.scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16)[None], self.q, self.scale)  # (1, N)
        return y[0].to(x.dtype)  # (N,)


# A matrix whose 4-bit copy is further than this (relative Frobenius error) from it was not stored on a 4-bit grid
# (the bundled models' embeddings, for one, or GGUF's 5-, 6- and 8-bit layers); it is kept in 8 bits instead.
INT4_MAX_ERROR = 0.01


def quantized(weight: torch.Tensor) -> MatVec | Int4MatVec | Int8MatVec:
    """4 bits where the matrix sits on a 4-bit grid already (GGUF's Q4_0, Q4_1 and Q4_K layers) and the kernel
    takes its shape, else 8 bits."""
    if Int4MatVec.fits(weight) and Int4MatVec.sample_error(weight) <= INT4_MAX_ERROR:
        int4 = Int4MatVec(weight)
        if int4.error <= INT4_MAX_ERROR:
            return int4
    return Int8MatVec(weight)


WEIGHTS = {"model": MatVec, "int4": quantized}
