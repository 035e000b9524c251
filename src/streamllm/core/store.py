"""``LayerStore``: one layer's keys and values, in the model's dtype or as 8-bit integers with a scale per token
and kv head.

An 8-bit store keeps, for every slot and kv head, the D numbers as int8 ``q`` and one float32 ``scale`` with
``x ~ q * scale``: ``scale = max|x| / 127`` and ``q = round(x / scale)``. The largest number of each row is exact,
every other is off by at most ``scale / 2``. That is a quarter of the bytes of float32 (half of bfloat16) plus
4 bytes per row, and it is what every reader of the cache sees: the torch paths read it back as the model's dtype
(``read``), the C++ decode step multiplies the int8 numbers by their scale inside its dot products.

Letters: B batch, Hkv kv heads, T tokens, C slots, D head dim.
"""

from __future__ import annotations

import torch

from .policy import Policy

KV_DTYPES = ("model", "int8")  # "model": the keys and values as the model computes them


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of D numbers (..., D) -> (int8 (..., D), float32 scales (...)). An all-zero row gets scale 0."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127  # (...)
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(xf * inverse[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``quantize``, up to its rounding. -> (..., D) of ``dtype``"""
    return (q.float() * scale[..., None]).to(dtype)


class LayerStore:
    """One layer's storage and the policy and rotary frequencies it was made with.

    ``full_keys`` and ``full_values`` are (B, Hkv, C + 1 + M_max, D): C slots, then the scratch ones the decode
    step uses (``cache.py``). With ``kv_dtype`` "int8" they are int8 and ``full_key_scales`` and
    ``full_value_scales`` (B, Hkv, C + 1 + M_max) float32 hold their scales; otherwise the scales are None.
    ``keys``, ``values`` (and the scales) are views without the scratch slots. Write through ``write`` and read
    through ``read`` to be right for either kind."""

    def __init__(
        self, policy: Policy, inv_freq: torch.Tensor, recall_slots: int = 0, kv_dtype: str = "model"
    ):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        self.policy, self.inv_freq = policy, inv_freq
        self.recall_slots = recall_slots  # M_max: scratch slots for keys recalled from memory
        self.quantized = kv_dtype == "int8"
        self.dtype: torch.dtype | None = None  # the model's dtype: what ``read`` gives back
        # all None until ``allocate``
        self.full_keys: torch.Tensor | None = None
        self.full_values: torch.Tensor | None = None
        self.full_key_scales: torch.Tensor | None = None
        self.full_value_scales: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.key_scales: torch.Tensor | None = None
        self.value_scales: torch.Tensor | None = None
        # (C,) the text position held by each slot, -1 when empty
        self.slot_pos = torch.empty(0, dtype=torch.long)

    @property
    def length(self) -> int:
        """Tokens held now."""
        return int((self.slot_pos >= 0).sum())

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's storage, scratch slots and scales included."""
        tensors = (self.full_keys, self.full_values, self.full_key_scales, self.full_value_scales)
        return sum(t.nbytes for t in tensors if t is not None)

    def allocate(self, like: torch.Tensor, size: int, dtype: torch.dtype | None = None) -> None:
        """Make ``size`` slots (keeping what is held), for keys shaped like ``like`` (B, Hkv, T, D) and of its
        dtype, or of ``dtype`` (the model's) where given."""
        have = self.slot_pos.numel()
        if size <= have and self.keys is not None:
            return
        B, Hkv, _, D = like.shape
        if self.dtype is None:
            self.dtype = dtype or like.dtype
        stored = torch.int8 if self.quantized else self.dtype
        spare = 1 + self.recall_slots
        full = [like.new_zeros(B, Hkv, size + spare, D, dtype=stored) for _ in range(2)]
        scales = [like.new_zeros(B, Hkv, size + spare, dtype=torch.float32) for _ in range(2)]
        slot_pos = torch.full((size,), -1, dtype=torch.long)  # (C,)
        held = (self.keys, self.values, self.key_scales, self.value_scales)
        for new, old in zip((*full, *scales), held, strict=True):
            # what is held already (scales only where 8-bit)
            if old is not None:
                new[:, :, :have] = old
        slot_pos[:have] = self.slot_pos
        self.full_keys, self.full_values = full
        self.keys, self.values = full[0][:, :, :size], full[1][:, :, :size]  # (B, Hkv, C, D)
        if self.quantized:
            self.full_key_scales, self.full_value_scales = scales
            self.key_scales, self.value_scales = scales[0][:, :, :size], scales[1][:, :, :size]
        self.slot_pos = slot_pos

    def read(self, at: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of slots ``at`` (a slice or an index tensor into all slots, scratch included) in
        the model's dtype -> (B, Hkv, N, D) each. Views of the storage where it is not quantized."""
        k, v = self._pick(self.full_keys, at), self._pick(self.full_values, at)
        if not self.quantized:
            return k, v
        ks, vs = self._pick(self.full_key_scales, at), self._pick(self.full_value_scales, at)
        dtype = self._model_dtype()
        return dequantize(k, ks, dtype), dequantize(v, vs, dtype)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The C slots' keys and values in the model's dtype, or None before the first write."""
        return None if self.keys is None else self.read(slice(0, self.slot_pos.numel()))

    def as_stored(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, N, D) as this store would give them back once written."""
        if not self.quantized:
            return keys, values
        return dequantize(*quantize(keys), keys.dtype), dequantize(*quantize(values), values.dtype)

    def write(self, at: slice | torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Store keys and values (B, Hkv, N, D) at slots ``at`` (a slice, or an index tensor into all slots),
        quantizing them where the store is 8-bit. Without ``values`` the values stay as they are."""
        if not self.quantized:
            self._put(self.full_keys, at, keys)
            if values is not None:
                self._put(self.full_values, at, values)
            return
        for full, scales, x in (
            (self.full_keys, self.full_key_scales, keys),
            (self.full_values, self.full_value_scales, values),
        ):
            if x is None:
                continue
            q, s = quantize(x)
            self._put(full, at, q)
            self._put(scales, at, s)

    def raw(self, at: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        """Slots ``at`` as stored: keys and values, and their scales where 8-bit."""
        names = ("keys", "values", "key_scales", "value_scales") if self.quantized else ("keys", "values")
        return {name: self._pick(getattr(self, f"full_{name}"), at) for name in names}

    def load_raw(self, saved: dict, at: slice | torch.Tensor) -> None:
        """Put slots ``at`` of a saved layer (``raw``'s names) back, converting between 8-bit and the model's
        dtype when the saved layer was stored the other way."""
        if self.quantized and "key_scales" in saved:
            for name in ("keys", "values", "key_scales", "value_scales"):
                self._put(getattr(self, f"full_{name}"), at, saved[name])
            return
        keys, values = saved["keys"], saved["values"]
        dtype = self._model_dtype()
        if "key_scales" in saved:  # saved 8-bit, kept in the model's dtype here
            keys = dequantize(keys, saved["key_scales"], dtype)
            values = dequantize(values, saved["value_scales"], dtype)
        self.write(at, keys.to(dtype), values.to(dtype))

    def _model_dtype(self) -> torch.dtype:
        if self.dtype is None:
            raise RuntimeError("this layer holds nothing yet")
        return self.dtype

    @staticmethod
    def _pick(t: torch.Tensor | None, at: slice | torch.Tensor) -> torch.Tensor:
        if t is None:
            raise RuntimeError("this layer holds nothing yet")
        if isinstance(at, slice):
            return t[:, :, at]
        return t.index_select(2, at if t.is_cpu else at.to(t.device))

    @staticmethod
    def _put(t: torch.Tensor | None, at: slice | torch.Tensor, x: torch.Tensor) -> None:
        if t is None:
            raise RuntimeError("this layer holds nothing yet")
        if isinstance(at, slice):
            t[:, :, at] = x
        else:
            t.index_copy_(2, at if t.is_cpu else at.to(t.device), x)
