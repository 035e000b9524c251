"""What the decode step (``decode.py``) reads from a model's blocks: its norms, in either of transformers' two
RMSNorm forms, and its projections, fused so that one matrix-vector product reads each input once.

Letters: E hidden size, F MLP width, Dq query width, Dkv key and value width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .quant import Int4MatVec, Int8MatVec, MatVec


class Norm:
    """transformers' RMSNorm, normalised in float32, in either of its two forms: Llama's scales by ``weight``
    after the cast back to the model dtype, Gemma's by ``1 + weight`` before it (``norm_form`` tells them apart)."""

    def __init__(self, module: nn.Module, form: str):
        weight = module.get_parameter("weight").detach()  # (N,)
        eps = _eps(module)
        if eps is None:
            raise ValueError(f"{type(module).__name__} names no epsilon")
        self.gemma = form == "gemma"
        self.weight = 1 + weight.float() if self.gemma else weight  # (N,)
        self.eps = eps
        self.shape = tuple(weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if x32.dim() == 1:  # the hidden state of one token: a dot product beats the general kernel's set-up
            normed = x32 * torch.rsqrt(torch.dot(x32, x32) / x32.numel() + self.eps)
        else:
            normed = F.rms_norm(x32, self.shape, eps=self.eps)
        if self.gemma:
            return (normed * self.weight).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def _eps(module: nn.Module) -> float | None:
    """An RMSNorm's epsilon, under either of the names transformers gives it."""
    return getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)


def norm_form(module: nn.Module) -> str | None:
    """Which RMSNorm ``module`` computes, found by running it: "llama", "gemma", or None for anything else."""
    weight = module.get_parameter("weight").detach()
    eps = _eps(module)
    if eps is None:
        return None
    x = torch.linspace(-2, 3, weight.numel())  # (N,) float32
    got = module(x.to(weight.dtype)[None])[0].float()  # (N,)
    normed = x * torch.rsqrt(x.pow(2).mean() + eps)
    tol = 1e-5 if weight.dtype == torch.float32 else 2e-2
    for form, scale in (("llama", weight.float()), ("gemma", 1 + weight.float())):
        if torch.allclose(got, normed * scale, rtol=tol, atol=tol):
            return form
    return None


@dataclass
class Layer:
    qkv: MatVec | Int4MatVec | Int8MatVec  # (Dq + 2 Dkv, E)
    qkv_bias: torch.Tensor | None
    o: MatVec | Int4MatVec | Int8MatVec  # (E, Dq)
    gate_up: MatVec | Int4MatVec | Int8MatVec  # (2 F, E)
    down: MatVec | Int4MatVec | Int8MatVec  # (E, F)
    norm_in: Norm
    norm_post: Norm  # before the MLP
    q_norm: Norm | None  # Qwen3 and Gemma3 normalise each head of q and k
    k_norm: Norm | None
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float
    attn_out_norm: Norm | None = None  # Gemma normalises what attention and the MLP add to the residual too
    mlp_out_norm: Norm | None = None


def fuse(linears: list[nn.Linear], share: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of linears that read the same input. With ``share`` each linear then keeps a
    view of its rows, so the stacked copy is the only one. A model that fuses them itself (Phi-3) gives one."""
    if len(linears) == 1:
        lin = linears[0]
        return lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    weight = torch.cat([lin.weight.detach() for lin in linears])  # (sum of outputs, E)
    has_bias = [lin.bias is not None for lin in linears]
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("cannot fuse linears of which only some have a bias")
    start = 0
    for lin in linears if share else []:
        n = lin.weight.shape[0]
        lin.weight.data = weight[start : start + n]  # a contiguous view: the fused copy is the only one
        if bias is not None:
            lin.bias.data = bias[start : start + n]
        start += n
    return weight, bias


def linears(module: nn.Module, fused: str, parts: tuple[str, ...]) -> list[nn.Linear]:
    """The projections that read one input: the model's own fused one where it has it, else its parts."""
    return [getattr(module, fused)] if hasattr(module, fused) else [getattr(module, name) for name in parts]
