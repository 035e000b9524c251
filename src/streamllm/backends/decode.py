"""``Decoder``: one new token through a decoder-only model, straight from its weights, on a ``KVCache``.

Decoding is a single token per forward, so its cost is the weights read plus the fixed cost of every operation
launched. transformers' module tree launches several hundred small operations per token and re-derives masks and
positions each time. This runs the same arithmetic with far fewer operations:
- q, k and v come from one fused matrix (and gate and up from another); the model's own projection weights become
  views of the fused ones, so no weight is stored twice;
- the cache plans the token once for all layers (its slot, what it sees, how far the sinks turn), and the rotary
  angles are computed once per token, not once per layer;
- the layer loop runs in C++ where the native kernels build (``native.py``, ``decode_kernels.cpp``): norms, rotary
  and attention as plain loops over the cache in place (attention split over blocks of keys so that every thread
  has work), bfloat16 matrix-vector products with AVX-512 BF16 instructions, and the 4- and 8-bit ones
  (``quant.py``) as integer products against x in two 8-bit parts (AVX-512 VNNI). The token's own key goes into a
  scratch slot past the cache's slots (``LayerStore.full_keys``) and the sinks are scored where they are stored,
  by the query turned the other way, so nothing is concatenated or copied;
- ``_python_step`` is the same step in torch operations (attention through ``attention.attend``), used where no
  compiler is present.
Either way the new key and value reach the cache through ``KVCache.commit``, like every other backend's.

Its arithmetic follows transformers' own (rotation and norms in the model dtype, scores gathered in float32), so
its logits match the general path within the dtype's rounding. Architectures opt in through
``arch.ARCHITECTURES``.

Letters: R streams, H heads, Hkv kv heads, G = H / Hkv, C stored slots, D head dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from ..core.cache import KVCache
from ..core.plan import Plan
from ..core.rotary import rotate_half
from . import native
from .angles import RotaryRows, RotaryTurns
from .arch import lookup, shape_of
from .attention import attend
from .blocks import Layer, Norm, fuse, linears, norm_form
from .quant import WEIGHTS, MatVec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Decoder:
    """Single-token forward for the architectures the table marks ``fast_decode``: Llama, Mistral, Qwen2/3,
    Phi-3 (its own fused projections, partial rotary) and Gemma3 (Gemma's norms, scaled embeddings, sliding
    layers). The native step runs the Llama-shaped ones (SiLU, Llama's norms, one attention kind); the others take
    the Python step.

    ``weights``: "model" multiplies by the model's own weights (exact); "int4" by 4-bit copies of the matrices
    that sit on a 4-bit grid already and 8-bit copies of the rest (``quant.quantized``): about a third of the
    bytes of bfloat16 to read per token, at the cost of a small change in the logits.
    """

    def __init__(self, model: PreTrainedModel, weights: str = "model"):
        if weights not in WEIGHTS:
            raise ValueError(f"unknown decode weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
        matvec = WEIGHTS[weights]
        self.weights = weights
        arch = lookup(model.config)
        if not arch.fast_decode:
            raise ValueError(f"{arch.family} has no fast decode path")
        config = model.config
        shape = shape_of(model)
        self.model = model
        self.H, self.Hkv, self.D = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self._turns = RotaryTurns(shape.inv_freqs[0])
        self._masks: dict[tuple, torch.Tensor] = {}  # native_mask of the steady plans, by ring shape
        self.layer_types = shape.layer_types
        self.rotary = model.model.rotary_emb
        self.typed_rotary = "layer_type" in inspect.signature(self.rotary.forward).parameters  # Gemma3's
        self._angle_rows = None if self.typed_rotary else RotaryRows(self.rotary, model.dtype)
        forms = {norm_form(m) for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
        form = forms.pop() if len(forms) == 1 else None
        if form is None:
            raise ValueError("the fast decode path needs one known RMSNorm form")
        self.layers = []
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv, qkv_bias = fuse(linears(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")), matvec is MatVec)
            gate_up, _ = fuse(linears(mlp, "gate_up_proj", ("gate_proj", "up_proj")), matvec is MatVec)
            gemma = hasattr(block, "pre_feedforward_layernorm")  # norms around both halves of the block
            self.layers.append(
                Layer(
                    matvec(qkv),
                    qkv_bias,
                    matvec(attn.o_proj.weight.detach()),
                    matvec(gate_up),
                    matvec(mlp.down_proj.weight.detach()),
                    Norm(block.input_layernorm, form),
                    Norm(block.pre_feedforward_layernorm if gemma else block.post_attention_layernorm, form),
                    Norm(attn.q_norm, form) if hasattr(attn, "q_norm") else None,
                    Norm(attn.k_norm, form) if hasattr(attn, "k_norm") else None,
                    getattr(mlp, "act_fn", None) or mlp.activation_fn,
                    attn.scaling,
                    Norm(block.post_attention_layernorm, form) if gemma else None,
                    Norm(block.post_feedforward_layernorm, form) if gemma else None,
                )
            )
        self.embed = model.model.embed_tokens
        scale = getattr(self.embed, "embed_scale", None)  # Gemma scales its embeddings by sqrt(E)
        self.embed_scale = None if scale is None else scale.to(self.embed.weight.dtype)
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.norm = Norm(model.model.norm, form)
        self.lm_head = matvec(model.lm_head.weight.detach())  # (V, E)
        self.native = self._native_step()

    def _native_step(self):
        """The same step in C++ over the same weights (``decode_kernels.cpp``), or None where it does not apply:
        no compiler, ``STREAMLLM_NATIVE=0``, or a model it does not compute (an activation other than SiLU, norms
        of another form or with different epsilons, Gemma's extra norms and scales, more than one attention kind
        or scaling)."""
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
            or self.norm.gemma
            or self.embed_scale is not None
            or self.softcap is not None
            or self.final_softcap is not None
            or len(set(self.layer_types)) > 1
            or len({layer.scaling for layer in self.layers}) > 1
        ):
            return None
        module = native.kernels()
        if module is None:
            return None
        layers, kinds = [], []
        for layer in self.layers:
            mats = (layer.qkv, layer.o, layer.gate_up, layer.down)
            layers.append(
                [t for m in mats for t in m.tensors]
                + [native.NONE if layer.qkv_bias is None else layer.qkv_bias]
                + [
                    native.NONE if n is None else n.weight
                    for n in (layer.norm_in, layer.norm_post, layer.q_norm, layer.k_norm)
                ]
            )
            kinds.append([m.KIND for m in mats])
        head = [self.norm.weight, *self.lm_head.tensors]
        return module.Step(
            layers,
            kinds,
            head,
            self.lm_head.KIND,
            self.H,
            self.Hkv,
            self.D,
            self.norm.eps,
            self.layers[0].scaling,
        )

    def weight_bytes(self) -> int:
        """Bytes of weights one decoded token reads (the matrices; norms and biases are a rounding error)."""
        mats = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return sum(m.nbytes for m in mats) + self.lm_head.nbytes

    def ready(self, cache: KVCache) -> bool:
        """Whether ``cache`` can take a fast step: it was made for this model, lives on the CPU and holds
        tokens."""
        return len(cache.layers) == len(self.layers) and all(
            layer.keys is not None and layer.keys.is_cpu for layer in cache.layers
        )

    def batches(self, cache: KVCache) -> bool:
        """Whether ``cache`` can go through the native step (``step_many``): ``ready``, and one plan serves all of
        its layers."""
        return self.native is not None and cache.uniform and self.ready(cache)

    @torch.no_grad()  # not inference_mode: a dense cache grown here must stay writable by the chunked path
    def step(self, cache: KVCache, token: int) -> torch.Tensor:
        """Feed one token; returns the logits (V,) that predict the next one. The cache must be ``ready``."""
        # (``ready`` is the caller's to check) a token that selects from memory needs its query first
        if (
            self.native is not None
            and cache.uniform
            and (cache.memory is None or not cache.memory.due(cache.seen))
        ):
            return self.step_many([cache], [token])[0]
        plans = cache.plan(1)  # per layer
        x = self.embed.weight[token]  # (E,)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        return self._python_step(cache, plans, x, self._angles(x, plans[0].model_pos))

    def _angles(self, x: torch.Tensor, pos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's rotary cos and sin (1, R) at the model positions ``pos`` (1,), from the model's own rotary
        module (one call per kind of layer)."""
        if self._angle_rows is not None:
            cos, sin = self._angle_rows(int(pos[0]))  # (R,) each
            return [(cos[None], sin[None])] * len(self.layers)
        kinds = {}
        for kind in set(self.layer_types):
            cos, sin = self.rotary(x, pos[None], kind)
            kinds[kind] = (cos[0], sin[0])
        return [kinds[kind] for kind in self.layer_types]

    @torch.no_grad()
    def step_many(self, caches: Sequence[KVCache], tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to each of several streams (each its own ``ready`` cache, all of one policy and size) in
        one pass of the native step, which reads every weight once for all of them. -> logits (R, V)"""
        # (the native step runs only models of one attention kind, whose rotary takes no layer type)
        if self.native is None or self._angle_rows is None:
            raise RuntimeError("several streams at once need the native decode step")
        plans = [cache.plan(1)[0] for cache in caches]
        numbers = [plan.numbers for plan in plans]  # (slot, model position, anchor shift) of each token
        # The C++ step stores each new key at its slot itself, unless an eviction hook must see the key it
        # replaces first; then the commit stores it from the scratch slot.
        slots = [n[0] if not c.hooked else -1 for n, c in zip(numbers, caches, strict=True)]
        S = plans[0].policy.num_sinks
        C = caches[0].layers[0].slot_pos.numel()
        room = caches[0].layers[0].recall_slots  # M_max: scratch slots of keys recalled from memory
        if any(plan.select for plan in plans):
            raise RuntimeError("a token that selects from memory goes through the Python step")
        x = (
            self.embed.weight[tokens[0]][None] if len(tokens) == 1 else self.embed.weight[list(tokens)]
        )  # (R, E)
        angles = _rows([self._angle_rows(n[1], stacked=True) for n in numbers])  # (R, 2, Dr): cos, sin
        masks = [self._native_mask(plan, C, room) for plan in plans]
        # the rotation that would move the sink keys, stored at 0..S-1, to where the token sees them; the step turns
        # the query the other way, as ``attention.attend`` does (a rotation moves both sides of a dot product alike)
        turns = _rows([self._turns(-n[2]) for n in numbers]) if S or room else native.NONE  # (R, 2 Dr)
        logits = self.native(
            x,
            angles[:, 0],
            angles[:, 1],
            turns,
            _rows(masks),  # (R, C + 1 + M_max)
            *_buffers(caches, len(self.layers)),
            slots,
            C,
            S,
        )
        for cache, slot in zip(caches, slots, strict=True):
            if slot >= 0:  # every layer stored its token already
                cache.commit_written()
                continue
            for i, store in enumerate(cache.layers):  # from scratch slot C, where the step left it
                cache.commit(i, *store.read(slice(C, C + 1)))
        return logits

    def _native_mask(self, plan: Plan, C: int, room: int) -> torch.Tensor:
        """``native_mask``, made once per ring shape for the steady plans (which all show every slot)."""
        if not plan.steady:
            return native_mask(plan, room)
        key = (C, room)
        if key not in self._masks:
            self._masks[key] = native_mask(plan, room)
        return self._masks[key]

    def _python_step(self, cache: KVCache, plans: list[Plan], x, angles) -> torch.Tensor:
        """The layers in torch operations; the native step does the same in C++. -> logits (V,) float32"""
        for i, layer in enumerate(self.layers):
            h = layer.norm_in(x)  # (E,)
            out = layer.o(self._attention(cache, i, plans[i], layer, h, *angles[i]))  # (E,)
            x = x + (out if layer.attn_out_norm is None else layer.attn_out_norm(out))
            h = layer.norm_post(x)  # (E,)
            gate, up = layer.gate_up(h).chunk(2)  # (F,) each
            out = layer.down(layer.act(gate) * up)  # (E,)
            x = x + (out if layer.mlp_out_norm is None else layer.mlp_out_norm(out))
        logits = self.lm_head(self.norm(x))  # (V,)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

    def _attention(self, cache: KVCache, i: int, plan: Plan, layer, h, cos, sin) -> torch.Tensor:
        """Self-attention of layer ``i`` for the new token, then its commit. -> (H*D,)"""
        H, Hkv, D = self.H, self.Hkv, self.D
        qkv = layer.qkv(h)  # (Dq + 2 Dkv,)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        qk = qkv[: (H + Hkv) * D].view(H + Hkv, D)  # (H + Hkv, D): q's heads, then k's
        v = qkv[(H + Hkv) * D :].view(1, Hkv, 1, D)  # (1, Hkv, 1, D)
        if layer.q_norm is not None:
            qk = torch.cat([layer.q_norm(qk[:H]), layer.k_norm(qk[H:])])  # (H + Hkv, D)
        R = cos.shape[-1]  # rotated dims: D, or fewer with partial rotary
        turned = qk[:, :R] * cos[0] + rotate_half(qk[:, :R]) * sin[0]  # (H + Hkv, R) at the model position
        qk = turned if R == D else torch.cat([turned, qk[:, R:]], dim=-1)  # (H + Hkv, D)
        q = qk[:H].view(1, H, 1, D)  # (1, H, 1, D)
        k = qk[H:].view(1, Hkv, 1, D)  # (1, Hkv, 1, D)
        store = cache.layers[i]
        recalled = cache.recall(i, q)
        out = attend(
            plan,
            q,
            store.stored(),
            store.as_stored(k, v),  # an 8-bit cache: the token sees its own key as the native step does
            store.inv_freq,
            layer.scaling,
            softcap=self.softcap,
            recalled=recalled,
        )  # (1, H, 1, D)
        cache.commit(i, k, v)
        return out.view(H * D)


def _rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)``; a view where there is one row."""
    return rows[0][None] if len(rows) == 1 else torch.stack(rows)


def _buffers(caches: Sequence[KVCache], L: int) -> list[list[list[torch.Tensor]]]:
    """The native step's view of the caches: keys, values, key scales, value scales, each per layer and per
    stream (the scales empty where a cache is not 8-bit). A single cache keeps its view until its storage is
    made again (the view holds the tensors, so their ids are not reused meanwhile)."""
    if len(caches) == 1:
        cache = caches[0]
        made = tuple(id(s.full_keys) for s in cache.layers)
        kept = cache.__dict__.get("_native_buffers")
        if kept is None or kept[0] != made:
            kept = cache.__dict__["_native_buffers"] = (made, _view(caches, L))
        return kept[1]
    return _view(caches, L)


def _view(caches: Sequence[KVCache], L: int) -> list[list[list[torch.Tensor]]]:
    stores = [[cache.layers[i] for cache in caches] for i in range(L)]
    keys = [[_held(s.full_keys) for s in layer] for layer in stores]
    values = [[_held(s.full_values) for s in layer] for layer in stores]
    if not any(s.quantized for layer in stores for s in layer):
        scales = [[native.NONE] * len(caches)] * L
        return [keys, values, scales, scales]
    key_scales = [
        [_held(s.full_key_scales) if s.quantized else native.NONE for s in layer] for layer in stores
    ]
    value_scales = [
        [_held(s.full_value_scales) if s.quantized else native.NONE for s in layer] for layer in stores
    ]
    return [keys, values, key_scales, value_scales]


def _held(t: torch.Tensor | None) -> torch.Tensor:
    """A store's tensor, which a ``ready`` cache holds."""
    if t is None:
        raise RuntimeError("the cache holds nothing yet")
    return t


def native_mask(plan: Plan, room: int = 0) -> torch.Tensor:
    """What the token sees in the native step's key layout -> (C + 1 + room,) bool: the stored slots the plan shows
    it (the anchored ones, slots 0..S-1, scored there with the turned query), itself in scratch slot C, and the
    ``plan.recalled`` keys recalled from memory after it (of ``room`` scratch slots)."""
    visible = plan.visible[0]  # (C + 1,)
    if not room:
        return visible
    return torch.cat([visible, torch.arange(room) < plan.recalled])


def decoder_for(model: PreTrainedModel, weights: str = "model") -> Decoder | None:
    """The model's ``Decoder`` for these weights, built once and kept on the model (building one twice would
    store its weights twice), or None when its architecture has no fast path."""
    if not lookup(model.config).fast_decode:
        return None
    kept = model.__dict__.setdefault("streamllm_decoders", {})
    if weights not in kept:
        kept[weights] = Decoder(model, weights)
    return kept[weights]
