"""Rotary position embedding as a pure rotation: the angles come from a model's own ``inv_freq``.

Relative shifts are exact rotations: rotating a vector rotated at position p by delta gives the vector rotated at
p + delta. Angles are computed in float64, so the shift stays accurate however far the stream has gone.
Letters: R rotary dims (<= head dim D), N positions.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shift_angles(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``delta`` (N,) times ``inv_freq`` (R/2,), laid out as transformers does. -> two (N, R) float64"""
    freqs = delta.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # (N, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, R)
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move ``x`` (..., N, D), rotated at some positions, by ``delta`` (N,) positions. Only the first R dims rotate
    (partial rotary, as GPT-NeoX and Phi do). The rotation runs in float32 or wider."""
    cos, sin = shift_angles(delta.to(x.device), inv_freq)  # (N, R)
    r = cos.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    rot = x[..., :r].to(work)  # (..., N, R)
    rot = rot * cos.to(work) + rotate_half(rot) * sin.to(work)
    if r == x.shape[-1]:
        return rot.to(x.dtype)
    return torch.cat((rot.to(x.dtype), x[..., r:]), dim=-1)
