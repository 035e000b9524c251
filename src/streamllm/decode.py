"""``Decoder``: one new token through a Llama-style model, straight from its weights, on a ``SinkCache``.

Decoding is a single token per forward, so its cost is the weights read plus the fixed cost of every operation
launched. transformers' module tree launches several hundred small operations per token and re-derives masks and
positions each time. This runs the same arithmetic with far fewer operations:
- q, k and v come from one fused matrix (and gate and up from another); the model's own projection weights become
  views of the fused ones, so no weight is stored twice;
- the rotary angles of the token, and the rotation that moves the sinks to where it sees them, are computed once per
  token, not once per layer;
- attention reads the cache in place, in one call per layer: the token's own key and the moved sink keys go into
  scratch slots past the cache's ring (``SinkLayer.full_keys``), so nothing is concatenated or copied, and every
  layer shares one mask row (the cache holds exactly the sinks and the window before the token);
- the new key is written into its slot without the policy's general-purpose bookkeeping;
- the layer loop itself runs in C++ where the native kernels build (``native.py``, ``decode_kernels.cpp``): norms,
  rotary, the sink moves and attention as plain loops (attention split over blocks of keys so that every thread
  has work), bfloat16 matrix-vector products with AVX-512 BF16 instructions, and the 4- and 8-bit ones through the
  same torch kernels. ``_python_step`` is the same step in torch operations, used where no compiler is present.

It reads and writes the same cache as the chunked path (``attention.py``), so prefill and decode mix freely, and its
arithmetic follows transformers' own (rotation and norms in the model dtype, scores gathered in float32), so its
logits match the general path within the dtype's rounding. Architectures opt in through ``arch.ARCHITECTURES``.

Letters: H heads, Hkv kv heads, G = H / Hkv, C stored slots, D head dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import native
from .arch import layer_inv_freqs, lookup
from .attention import FLASH_CPU
from .cache import SinkCache
from .rotary import rotate_half, shift_angles


class _Norm:
    """transformers' RMSNorm: normalise in float32, back to the model dtype, then scale."""

    def __init__(self, module: nn.Module):
        self.weight = module.weight.detach()  # (N,)
        self.eps = module.variance_epsilon
        self.shape = tuple(self.weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if x32.dim() == 1:  # the hidden state of one token: a dot product beats the general kernel's set-up
            return self.weight * (x32 * torch.rsqrt(torch.dot(x32, x32) / x32.numel() + self.eps)).to(x.dtype)
        return self.weight * F.rms_norm(x32, self.shape, eps=self.eps).to(x.dtype)


class _MatVec:
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


class _Int4MatVec:
    """y = W x with W held as 4-bit integers in groups of 32 inputs, each group with its own scale and minimum:
    the layout of GGUF's Q4_1, in which the bundled models' layers are published, so those come back almost
    exactly. Reads a quarter of the bytes of bfloat16; torch's CPU int4 kernel takes bfloat16 inputs."""

    GROUP = 32  # decode_kernels.cpp assumes it too
    KIND = 1

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
        low = w.amin(-1)  # (N, K/32)
        scale = ((w.amax(-1) - low) / 15).clamp(min=1e-12)  # (N, K/32)
        q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15)  # (N, K/32, 32)
        self.error = float((q * scale[..., None] + low[..., None] - w).norm() / w.norm().clamp(min=1e-12))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(N, K), 1)
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        self.scale_zero = (
            torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        )  # (K/32, N, 2)

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


class _Int8MatVec:
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
# (the bundled models' embeddings, for one); it is kept in 8 bits instead.
INT4_MAX_ERROR = 0.01


def _quantized(weight: torch.Tensor) -> _MatVec | _Int4MatVec | _Int8MatVec:
    """4 bits where the matrix sits on a 4-bit grid already (Q4_1 layers) and the kernel takes its shape, else
    8 bits."""
    if _Int4MatVec.fits(weight):
        int4 = _Int4MatVec(weight)
        if int4.error <= INT4_MAX_ERROR:
            return int4
    return _Int8MatVec(weight)


WEIGHTS = {"model": _MatVec, "int4": _quantized}


@dataclass
class _Layer:
    qkv: _MatVec | _Int4MatVec | _Int8MatVec  # (Dq + 2 Dkv, E)
    qkv_bias: torch.Tensor | None
    o: _MatVec | _Int4MatVec | _Int8MatVec  # (E, Dq)
    gate_up: _MatVec | _Int4MatVec | _Int8MatVec  # (2 F, E)
    down: _MatVec | _Int4MatVec | _Int8MatVec  # (E, F)
    norm_in: _Norm
    norm_post: _Norm
    q_norm: _Norm | None  # Qwen3 normalises each head of q and k
    k_norm: _Norm | None
    act: nn.Module


@dataclass
class _Token:
    """One token about to be decoded on one stream: its text position, its slot, its embedding (E,), its rotary
    angles (1, D), the sinks' rotation (D, D) float32 (None without sinks) and what it sees (C + 1 + S,) bool."""

    t: int
    slot: int
    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    turn: torch.Tensor | None
    visible: torch.Tensor

    def commit(self, cache: SinkCache) -> None:
        for store in cache.layers:
            store.record(self.slot, self.t)


def _fuse(linears: list[nn.Linear], share: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of linears that read the same input. With ``share`` each linear then keeps a
    view of its rows, so the stacked copy is the only one."""
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


class Decoder:
    """Single-token forward for the architectures the table marks ``fast_decode`` (Llama, Mistral, Qwen2/3).

    ``weights``: "model" multiplies by the model's own weights (exact); "int4" by 4-bit copies of the matrices
    that sit on a 4-bit grid already and 8-bit copies of the rest (``_quantized``): about a third of the bytes
    of bfloat16 to read per token, at the cost of a small change in the logits.
    """

    def __init__(self, model: nn.Module, weights: str = "model"):
        if weights not in WEIGHTS:
            raise ValueError(f"unknown decode weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
        matvec = WEIGHTS[weights]
        self.weights = weights
        arch = lookup(model.config)
        if not arch.fast_decode:
            raise ValueError(f"{arch.family} has no fast decode path")
        config = model.config
        self.model = model
        self.H = config.num_attention_heads
        self.Hkv = config.num_key_value_heads
        self.D = getattr(config, "head_dim", None) or config.hidden_size // self.H
        self.inv_freq = layer_inv_freqs(model)[0]
        if 2 * self.inv_freq.numel() != self.D:
            raise ValueError("the fast decode path needs rotary embedding over the whole head")
        self.rotary = model.model.rotary_emb
        self.layers = []
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], share=matvec is _MatVec)
            gate_up, _ = _fuse([mlp.gate_proj, mlp.up_proj], share=matvec is _MatVec)
            self.layers.append(
                _Layer(
                    matvec(qkv),
                    qkv_bias,
                    matvec(attn.o_proj.weight.detach()),
                    matvec(gate_up),
                    matvec(mlp.down_proj.weight.detach()),
                    _Norm(block.input_layernorm),
                    _Norm(block.post_attention_layernorm),
                    _Norm(attn.q_norm) if hasattr(attn, "q_norm") else None,
                    _Norm(attn.k_norm) if hasattr(attn, "k_norm") else None,
                    mlp.act_fn,
                )
            )
        self.scaling = self.model.model.layers[0].self_attn.scaling
        self.embed = model.model.embed_tokens
        self.norm = _Norm(model.model.norm)
        self.lm_head = matvec(model.lm_head.weight.detach())  # (V, E)
        self.native = self._native_step()

    def _native_step(self):
        """The same step in C++ over the same weights (``decode_kernels.cpp``), or None where it does not apply:
        no compiler, ``STREAMLLM_NATIVE=0``, an activation other than SiLU, or norms with different epsilons."""
        norms = [self.norm] + [
            n
            for layer in self.layers
            for n in (layer.norm_in, layer.norm_post, layer.q_norm, layer.k_norm)
            if n is not None
        ]
        probe = torch.linspace(-6, 6, 97)
        if (
            not all(torch.equal(layer.act(probe), F.silu(probe)) for layer in self.layers)
            or len({n.eps for n in norms}) > 1
        ):
            return None
        module = native.kernels()
        if module is None:
            return None
        none = torch.empty(0)  # what the C++ side reads as "absent"
        layers, kinds = [], []
        for layer in self.layers:
            mats = (layer.qkv, layer.o, layer.gate_up, layer.down)
            layers.append(
                [t for m in mats for t in m.tensors]
                + [none if layer.qkv_bias is None else layer.qkv_bias]
                + [
                    none if n is None else n.weight
                    for n in (layer.norm_in, layer.norm_post, layer.q_norm, layer.k_norm)
                ]
            )
            kinds.append([m.KIND for m in mats])
        head = [self.norm.weight, *self.lm_head.tensors]
        return module.Step(
            layers, kinds, head, self.lm_head.KIND, self.H, self.Hkv, self.D, self.norm.eps, self.scaling
        )

    def weight_bytes(self) -> int:
        """Bytes of weights one decoded token reads (the matrices; norms and biases are a rounding error)."""
        mats = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return sum(m.nbytes for m in mats) + self.lm_head.nbytes

    def ready(self, cache: SinkCache) -> bool:
        """Whether ``cache`` can take a fast step: it lives on the CPU, and every layer exists and uses the
        cache's own policy (no layer of the model limits itself to a sliding window)."""
        return len(cache.layers) == len(self.layers) and all(
            layer.policy == cache.policy and layer.keys is not None and layer.keys.device.type == "cpu"
            for layer in cache.layers
        )

    @torch.no_grad()  # not inference_mode: a dense cache grown here must stay writable by the chunked path
    def step(self, cache: SinkCache, token: int) -> torch.Tensor:
        """Feed one token; returns the logits (V,) that predict the next one. The cache must be ``ready``."""
        if self.native is not None:
            return self.step_many([cache], [token])[0]
        row = self._prepare(cache, token)
        logits = self._python_step(cache, row.x, row.cos, row.sin, row.turn, row.visible, row.slot)
        row.commit(cache)
        return logits

    @torch.no_grad()
    def step_many(self, caches: Sequence[SinkCache], tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to each of several streams (each its own ``ready`` cache, all of one policy) in one pass
        of the native step, which reads every weight once for all of them. -> logits (R, V)"""
        if self.native is None:
            raise RuntimeError("several streams at once need the native decode step")
        rows = [self._prepare(cache, token) for cache, token in zip(caches, tokens, strict=True)]
        policy = caches[0].layers[0].policy
        logits = self.native(
            torch.stack([row.x for row in rows]),  # (R, E)
            torch.cat([row.cos[0] for row in rows]),  # (R, D)
            torch.cat([row.sin[0] for row in rows]),  # (R, D)
            torch.stack([row.turn for row in rows]) if policy.num_sinks else torch.empty(0),  # (R, D, D)
            torch.stack([row.visible for row in rows]),  # (R, C + 1 + S)
            [[cache.layers[i].full_keys for cache in caches] for i in range(len(self.layers))],
            [[cache.layers[i].full_values for cache in caches] for i in range(len(self.layers))],
            [row.slot for row in rows],
            caches[0].layers[0].keys.shape[2],
            policy.num_sinks,
        )
        for row, cache in zip(rows, caches, strict=True):
            row.commit(cache)
        return logits

    def _prepare(self, cache: SinkCache, token: int) -> _Token:
        """Where the token goes and what it sees, computed once for all layers."""
        first = cache.layers[0]
        policy = first.policy
        t = first.seen  # text position of the token
        virtual = t - first.offset  # the position the model rotates it at
        slot = int(policy.slot_of(torch.tensor([t]))[0])
        for store in cache.layers:
            store.reserve(slot + 1)
        x = self.embed.weight[token]  # (E,)
        cos, sin = self.rotary(x, torch.tensor([[virtual]]))  # (1, 1, D), model dtype
        # The sink keys, rotated at 0..S-1, are moved to where this token sees them: by its virtual position
        # minus its position relative to the sinks (in-cache, or its text position with positions="text").
        shift = virtual - int(policy.cache_positions(torch.tensor([t]))[0])
        turn = _rotation_matrix(shift, self.inv_freq) if policy.num_sinks else None  # (D, D) float32
        visible = self._visible(first.slot_pos, policy.num_sinks)  # (C + 1 + S,) bool
        return _Token(t, slot, x, cos[0], sin[0], turn, visible)

    def _python_step(self, cache, x, cos, sin, sink_turn, visible, slot) -> torch.Tensor:
        """The layers in torch operations; the native step does the same in C++. -> logits (V,) float32"""
        visible = (
            torch.zeros(visible.shape, dtype=x.dtype).masked_fill_(~visible, float("-inf")).view(1, 1, 1, -1)
        )
        for layer, store in zip(self.layers, cache.layers, strict=True):
            h = layer.norm_in(x)  # (E,)
            x = x + layer.o(self._attention(layer, store, h, cos, sin, sink_turn, visible, slot))  # (E,)
            h = layer.norm_post(x)  # (E,)
            gate, up = layer.gate_up(h).chunk(2)  # (F,) each
            x = x + layer.down(layer.act(gate) * up)  # (E,)
        return self.lm_head(self.norm(x)).float()  # (V,)

    def _attention(self, layer, store, h, cos, sin, sink_turn, visible, slot) -> torch.Tensor:
        """Self-attention of one layer for the new token; writes its key and value into ``slot``. -> (H*D,)"""
        H, Hkv, D = self.H, self.Hkv, self.D
        qkv = layer.qkv(h)  # (Dq + 2 Dkv,)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        qk = qkv[: (H + Hkv) * D].view(H + Hkv, D)  # (H + Hkv, D): q's heads, then k's
        v = qkv[(H + Hkv) * D :].view(Hkv, D)  # (Hkv, D)
        if layer.q_norm is not None:
            qk = torch.cat([layer.q_norm(qk[:H]), layer.k_norm(qk[H:])])  # (H + Hkv, D)
        qk = qk * cos[0] + rotate_half(qk) * sin[0]  # (H + Hkv, D), rotated at the virtual position
        keys, values = store.full_keys[0], store.full_values[0]  # (Hkv, C + 1 + S, D)
        C, S = store.keys.shape[2], store.policy.num_sinks
        keys[:, C], values[:, C] = qk[H:], v  # the token sees itself through the first scratch slot
        if S:
            keys[:, C + 1 :] = keys[:, :S].float() @ sink_turn  # (Hkv, S, D): the sinks, moved
            values[:, C + 1 :] = values[:, :S]
        q = qk[:H].view(1, Hkv, H // Hkv, D)  # (1, Hkv, G, D): a kv head's G query heads as G rows
        out, _ = FLASH_CPU(
            q, keys[None], values[None], attn_mask=visible, scale=self.scaling
        )  # (1, Hkv, G, D)
        keys[:, slot], values[:, slot] = qk[H:], v
        return out.view(H * D)  # (H*D,)

    @staticmethod
    def _visible(slot_pos: torch.Tensor, S: int) -> torch.Tensor:
        """What the token attends to, over the cache's slots and the scratch ones -> (C + 1 + S,) bool: every
        held slot except the sinks' own (their moved copies stand in for them), itself, and the copies of the
        sinks held so far."""
        held = slot_pos >= 0  # (C,)
        mask = torch.cat([held, torch.ones(1, dtype=torch.bool), held[:S]])  # (C + 1 + S,)
        mask[:S] = False
        return mask


def _rotation_matrix(shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """The rotary rotation by ``shift`` positions as a matrix M (D, D), float32: ``x @ M`` equals
    ``rotary.rotate(x, shift)`` (x * cos + rotate_half(x) * sin), in one small product instead of six operations."""
    cos, sin = shift_angles(torch.tensor([shift]), inv_freq)  # (1, D) float64 each
    D = cos.shape[1]
    half = D // 2
    matrix = torch.diag(cos[0])  # (D, D)
    idx = torch.arange(half)
    matrix[idx + half, idx] = -sin[0, :half]  # rotate_half(x)[j] = -x[j + D/2] for j < D/2
    matrix[idx, idx + half] = sin[0, half:]  # and x[j - D/2] above
    return matrix.float()


def decoder_for(model: nn.Module, weights: str = "model") -> Decoder | None:
    """The model's ``Decoder`` for these weights, built once and kept on the model (building one twice would
    store its weights twice), or None when its architecture has no fast path."""
    if not lookup(model.config).fast_decode:
        return None
    kept = model.__dict__.setdefault("streamllm_decoders", {})
    if weights not in kept:
        kept[weights] = Decoder(model, weights)
    return kept[weights]
