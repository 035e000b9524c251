"""The matrix-vector products of the decode step: the model's own weights, or 4- and 8-bit copies of them.

Each class holds one weight matrix W (N, K) in some form and computes y = W x; ``KIND`` tells the native step
(``decode_kernels.cpp``) which product to run on the same ``tensors``.

Where the native kernels build, the 4- and 8-bit copies are laid out in tiles for its integer kernels, which both
the native and the Python step call: x is written per group of 32 inputs as s (q + e / 254) with q and e 8-bit
integers (s = max|x| / 127), each group's products are summed as integers (AVX-512 VNNI: 64 per instruction) and
then scaled in float32 (``docs/design.md``, "Integer products"). Tiles hold 16 output rows, with bytes placed so
that one VNNI instruction multiplies the 16 rows by 4 inputs:
- 4-bit, per tile and group of 32 inputs: 256 bytes, byte 64 c + 4 j + b holding row j's q for input 8 c + b in
  its low half and for input 8 c + 4 + b in its high half; then the group's 16 steps and 16 lows in float16;
- 8-bit: W + 128 as bytes, row j's inputs 4 c + b at byte 64 c + 4 j + b of the tile's 64-byte chunk c; one
  float32 scale per row. Rows and inputs are padded with zeros to whole tiles and groups.
Without the native kernels the copies take torch's int4 and int8 layouts and kernels, which round x to bfloat16.

Letters: N outputs, K inputs, T = N / 16 tiles, G = K / 32 groups.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..home import home
from . import native

log = logging.getLogger(__name__)


class MatVec:
    """y = W x with the model's own weight (N, K), in the model's dtype."""

    KIND = 0  # how the native step (decode_kernels.cpp) multiplies by it

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # (N, K)
        # bfloat16 and float32 go through the native step's own product where it builds, so that both steps
        # multiply alike (the native side hands float32 to MKL where the CPU lacks AVX-512)
        native_product = weight.dtype in (torch.bfloat16, torch.float32) and weight.is_contiguous()
        self.kernels = native.kernels() if native_product else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.matmul(self.KIND, self.weight, native.NONE, x[None])[0]  # (N,)
        return torch.mv(self.weight, x)  # (N,)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, native.NONE  # kind 0 has no second tensor

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class Int4MatVec:
    """y = W x with W held as 4-bit integers in groups of 32 inputs, each group with its own scale and minimum.

    That is the layout of GGUF's Q4_1, and also what Q4_0 and the sub-blocks of Q4_K come back as once dequantized:
    in every one of them each group of 32 weights sits on a grid ``low + q * step`` with q in 0..15. A group need
    not use the whole grid (Q4_K fits its scales per block of 256), so the grid is found per group by trying
    every count of steps between its lowest and highest weight, 15 down to 1, and keeping the one that fits best:
    such layers come back exactly up to the rounding of the scales (float16 in the native tiles, bfloat16 in
    torch's layout). Reads a quarter of the bytes of bfloat16."""

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
        w = weight.detach().float().view(N, K // self.GROUP, self.GROUP)  # (N, G, 32)
        fitted = [self._fit(w[r : r + self.ROWS]) for r in range(0, N, self.ROWS)]
        q, step, low = (torch.cat(parts) for parts in zip(*fitted, strict=True))  # (N, G, 32), (N, G) twice
        self.kernels = native.kernels()
        if self.kernels is not None:
            # float16, as the tiles keep them (an overflow shows as an infinite error)
            step, low = step.half(), low.half()
            self.error = self._error(w, q, step.float(), low.float())
            self.packed = self._pack(q.to(torch.uint8))  # (T, G, 256)
            T, G = N // 16, K // self.GROUP
            scales = torch.stack([step.view(T, 16, G), low.view(T, 16, G)], dim=1)  # (T, 2, 16, G)
            self.scale_zero = scales.permute(0, 3, 1, 2).contiguous()  # (T, G, 2, 16)
            return
        self.error = self._error(w, q, step, low)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(N, K), 1)
        zero = low + 8 * step  # the kernel computes (q - 8) * scale + zero
        self.scale_zero = (
            torch.stack([step.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        )  # (G, N, 2)

    @staticmethod
    def _pack(q: torch.Tensor) -> torch.Tensor:
        """4-bit numbers q (N, G, 32) uint8 -> the tiles (T, G, 256) of the native kernel (module docstring)."""
        N, G, _ = q.shape
        parts = q.view(N // 16, 16, G, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # (T, G, c, j, b, half)
        return (parts[..., 0] | (parts[..., 1] << 4)).reshape(N // 16, G, 256).contiguous()

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
        if self.kernels is not None:
            return self.kernels.matmul(self.KIND, self.packed, self.scale_zero, x[None])[0]  # (N,)
        x16 = x.to(torch.bfloat16)[None]  # (1, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x16, self.packed, self.GROUP, self.scale_zero
        )  # (1, N)
        return y[0].to(x.dtype)  # (N,)


class Int8MatVec:
    """y = W x with W held as 8-bit integers, one scale per output row: max|row| / 127."""

    KIND = 2

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().float()  # (N, K)
        scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)  # (N,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127)  # (N, K)
        self.kernels = native.kernels()
        if self.kernels is not None:
            self.q = self._pack(q)  # (T, Kp / 4, 64)
            self.scale = scale  # (N,) float32
            return
        self.q = _with_room(q.to(torch.int8))  # (N, K)
        self.scale = _with_room(scale.to(torch.bfloat16))  # (N,)

    @staticmethod
    def _pack(q: torch.Tensor) -> torch.Tensor:
        """8-bit numbers q (N, K) -> the tiles (T, Kp / 4, 64) of the native kernel, as bytes q + 128, padded to
        whole tiles and groups of 32 with zeros (module docstring)."""
        N, K = q.shape
        Np, Kp = -(-N // 16) * 16, -(-K // 32) * 32
        padded = torch.full((Np, Kp), 128, dtype=torch.uint8)
        padded[:N, :K] = (q + 128).to(torch.uint8)
        return (
            padded.view(Np // 16, 16, Kp // 4, 4)
            .permute(0, 2, 1, 3)
            .reshape(Np // 16, Kp // 4, 64)
            .contiguous()
        )

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q, self.scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.matmul(self.KIND, self.q, self.scale, x[None])[0]  # (N,)
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16)[None], self.q, self.scale)  # (1, N)
        return y[0].to(x.dtype)  # (N,)


def _with_room(t: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """``t`` (N, ...) as a view of the first N rows of zeros-padded storage ``rows`` longer. torch's int8 kernel
    (``_weight_int8pack_mm``) reads past the last row, and crashed where a tensor ended at the end of its
    allocation (the tiny test models' 101-row output layer); the room keeps those reads inside the storage."""
    held = torch.zeros((t.shape[0] + rows, *t.shape[1:]), dtype=t.dtype)
    held[: t.shape[0]] = t
    return held[: t.shape[0]]


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


def kept_quantized(weight: torch.Tensor) -> MatVec | Int4MatVec | Int8MatVec:
    """``quantized(weight)``, kept on disk (``$STREAMLLM_HOME/quant``) under the sha256 of the weight's bytes, dtype
    and shape, the layout (native tiles or torch's) and this file's source: fitting SmolLM2's matrices takes about
    2 s at every start, hashing and reading them back a quarter of that. A file that cannot be read is fitted again
    and replaced; a folder that cannot be written only costs the fit."""
    w = weight.detach().contiguous()
    layout = "tiles" if native.kernels() is not None else "torch"
    digest = hashlib.sha256(f"{_SOURCE}|{layout}|{w.dtype}|{tuple(w.shape)}|".encode())
    digest.update(w.view(torch.uint8).reshape(-1).numpy().data)
    path = home() / "quant" / f"{digest.hexdigest()[:32]}.safetensors"
    try:
        return _read_kept(path)
    except (OSError, ValueError, KeyError, SafetensorError):
        pass
    made = quantized(weight)
    try:
        _write_kept(path, made)
    except OSError as exc:
        log.debug("could not keep the quantized weights in %s: %s", path.parent, exc)
    return made


_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
_KEPT: dict[str, tuple[type[Int4MatVec] | type[Int8MatVec], tuple[str, str]]] = {
    "int4": (Int4MatVec, ("packed", "scale_zero")),
    "int8": (Int8MatVec, ("q", "scale")),
}


def _write_kept(path: Path, made) -> None:
    kind = "int4" if isinstance(made, Int4MatVec) else "int8"
    names = _KEPT[kind][1]
    meta = {"kind": kind, "error": repr(getattr(made, "error", 0.0))}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    save_file({n: getattr(made, n).contiguous() for n in names}, str(partial), metadata=meta)
    os.replace(partial, path)


def _read_kept(path: Path) -> Int4MatVec | Int8MatVec:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        cls, names = _KEPT[meta["kind"]]
        made = cls.__new__(cls)
        for n in names:
            setattr(made, n, f.get_tensor(n))
    made.kernels = native.kernels()
    if isinstance(made, Int8MatVec) and made.kernels is None:  # torch's layout: see _with_room
        made.q, made.scale = _with_room(made.q), _with_room(made.scale)
    if isinstance(made, Int4MatVec):
        made.error = float(meta["error"])
    return made


WEIGHTS = {"model": MatVec, "int4": kept_quantized}
