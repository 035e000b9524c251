"""``SinkCache``: a transformers ``Cache`` that keeps attention sinks plus a rolling window, at constant size.

Storage (per layer): one key and one value tensor of ``num_sinks + window`` slots. Sinks sit in slots 0..S-1,
rotated at their in-cache positions 0..S-1; window tokens sit in a ring after them, rotated once at their
*virtual* position (text position minus ``offset``) and never touched again (see DESIGN-NOTES: the distance from
a query to a window key is the same in the cache as in the text). Eviction is an overwrite: no copy, no
re-rotation. Only the query is rotated a second time, to its in-cache position, for the sink block.

transformers calls ``update`` and then the attention function in the same layer forward. The attention function
gets no cache argument, so ``update`` hands the layer over through a context variable and the registered
``streamllm`` attention function (``attention.py``) does the attending and then commits the new keys.

Letters: B batch, H heads, Hkv kv heads, T new tokens, C slots, D head dim.
"""

from __future__ import annotations

import contextvars
import logging

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import StreamConfig
from .policy import Policy
from .rotary import rotate

log = logging.getLogger(__name__)

# The layer whose new keys await the attention function of the same layer forward.
HANDOFF: contextvars.ContextVar[SinkLayer | None] = contextvars.ContextVar("streamllm_handoff", default=None)


class NotPreparedError(RuntimeError):
    pass


class SinkLayer(CacheLayerMixin):
    """One layer's sinks + ring window."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: Policy, layer_idx: int, memo: dict | None = None):
        super().__init__()
        self.base_policy = policy
        self.layer_idx = layer_idx
        self.policy: Policy | None = None  # known at the first attention call (it may be a sliding layer)
        self.inv_freq: torch.Tensor | None = None
        self.keys = self.values = None  # (B, Hkv, C, D) views of full_keys / full_values
        self.full_keys = self.full_values = None  # (B, Hkv, C + 1 + S, D): C slots and scratch ones
        self.slot_pos: torch.Tensor | None = None  # (C,) text position held by each slot, -1 when empty
        self.seen = 0  # tokens processed: the next token's text position
        self.offset = 0  # virtual position = text position - offset, for window keys
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.memo = {} if memo is None else memo  # shared by all layers: per-chunk masks (attention.py)

    # -- transformers' layer contract ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.base_policy.capacity is None else self.base_policy.capacity

    def reset(self) -> None:
        self.keys = self.values = self.slot_pos = None
        self.full_keys = self.full_values = None
        self.seen = self.offset = 0
        self.pending = None

    # -- storage -----------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens held now."""
        return 0 if self.slot_pos is None else int((self.slot_pos >= 0).sum())

    def bind(self, policy: Policy, inv_freq: torch.Tensor) -> None:
        if self.policy is None:
            self.policy, self.inv_freq = policy, inv_freq

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys (B, Hkv, C, D), values (B, Hkv, C, D) and their text positions (C,) as they are now."""
        return self.keys, self.values, self.slot_pos

    def commit(self, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor) -> None:
        """Store the new keys (B, Hkv, T, D) of text positions ``pos`` (T,) that the policy keeps."""
        seen = int(pos[-1]) + 1
        keep = self.policy.kept_after(pos, seen)  # (T,)
        if self.policy.capacity is not None and not bool(keep.all()):
            k_new, v_new, pos = k_new[:, :, keep], v_new[:, :, keep], pos[keep]
        slots = self.policy.slot_of(pos).to(k_new.device)  # (T',)
        need = int(slots.max()) + 1 if pos.numel() else 0
        self._ensure_slots(k_new, need)
        self.keys.index_copy_(2, slots, k_new)
        self.values.index_copy_(2, slots, v_new)
        self.slot_pos[slots.cpu()] = pos
        self.seen = seen

    def reserve(self, need: int) -> None:
        """Make room for ``need`` slots (dense caches grow; bounded ones are allocated whole)."""
        self._ensure_slots(self.keys, need)

    def record(self, slot: int, pos: int) -> None:
        """Note that the token at text position ``pos`` now fills ``slot`` (its keys written by the caller)."""
        self.slot_pos[slot] = pos
        self.seen = pos + 1

    def _ensure_slots(self, like: torch.Tensor, need: int) -> None:
        cap = self.policy.capacity
        have = 0 if self.keys is None else self.keys.shape[2]
        if need <= have:
            return
        size = cap if cap is not None else max(need, 2 * have, 256)  # dense grows by doubling
        B, Hkv, _, D = like.shape
        # Scratch slots past the last, for the decode path (decode.py): the token being decoded and the sinks
        # rotated to where that token sees them, so one fused attention call covers everything it attends to.
        # ``keys``/``values`` are views without them.
        spare = 1 + self.policy.num_sinks
        full_keys = like.new_zeros(B, Hkv, size + spare, D)  # (B, Hkv, C + 1 + S, D)
        full_values = like.new_zeros(B, Hkv, size + spare, D)  # (B, Hkv, C + 1 + S, D)
        slot_pos = torch.full((size,), -1, dtype=torch.long)  # (C,)
        if have:
            full_keys[:, :, :have], full_values[:, :, :have], slot_pos[:have] = (
                self.keys,
                self.values,
                self.slot_pos,
            )
        self.full_keys, self.full_values, self.slot_pos = full_keys, full_values, slot_pos
        self.keys, self.values = full_keys[:, :, :size], full_values[:, :, :size]  # (B, Hkv, C, D)

    # -- saving and restoring --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This layer's storage and counters, enough to continue the stream in another process.

        Only slots that were ever written are kept (a young stream holds fewer than ``cache_size`` tokens).
        Tensors are the live ones, not copies; clone them if the stream goes on while they are in use.
        """
        written = (
            torch.empty(0, dtype=torch.long) if self.slot_pos is None else (self.slot_pos >= 0).nonzero()
        )
        used = int(written.max()) + 1 if written.numel() else 0
        policy = self.policy
        return {
            "keys": None if self.keys is None else self.keys[:, :, :used],  # (B, Hkv, used, D)
            "values": None if self.values is None else self.values[:, :, :used],  # (B, Hkv, used, D)
            "slot_pos": None if self.slot_pos is None else self.slot_pos[:used],  # (used,)
            "seen": self.seen,
            "offset": self.offset,
            "num_sinks": None if policy is None else policy.num_sinks,
            "window": None if policy is None else policy.window,
            "text_positions": False if policy is None else policy.text_positions,
        }

    def load_state_dict(self, state: dict, inv_freq: torch.Tensor) -> None:
        """Restore what ``state_dict`` returned. ``inv_freq`` is the layer's rotary frequencies (from the prepared
        model): the policy and frequencies must be bound before the first forward, because ``rebase`` may rotate
        the window keys before any attention call binds them."""
        self.reset()
        self.seen, self.offset = int(state["seen"]), int(state["offset"])
        if state["num_sinks"] is not None:
            policy = Policy(
                int(state["num_sinks"]), state["window"], bool(state.get("text_positions", False))
            )
            self.policy, self.inv_freq = policy, inv_freq
        keys = state["keys"]
        if keys is None:
            return
        if self.policy is None:
            raise ValueError(f"layer {self.layer_idx}: stored keys without a policy")
        self._ensure_slots(keys, max(keys.shape[2], 1))
        used = keys.shape[2]
        self.keys[:, :, :used] = keys
        self.values[:, :, :used] = state["values"]
        self.slot_pos[:used] = state["slot_pos"]
        self.lazy_initialization(self.keys, self.values)

    def rebase(self, shift: int) -> None:
        """Rotate window keys back by ``shift`` positions so that virtual positions stay small."""
        if self.keys is not None and self.policy is not None:
            S = self.policy.num_sinks
            ring = self.keys[:, :, S:]  # (B, Hkv, W, D)
            delta = torch.full((ring.shape[2],), -shift, dtype=torch.long)
            ring.copy_(rotate(ring, delta, self.inv_freq))
        self.offset += shift


class SinkCache(Cache):
    """Drop-in attention-sink cache for transformers 5 (``model.generate(..., past_key_values=SinkCache())``).

    The model must be prepared first (``streamllm.prepare(model)``; ``streamllm.load_model`` does it). Reports the
    number of tokens seen as its sequence length, so ``generate`` hands the model text positions.
    """

    def __init__(
        self, num_sinks: int = 4, window: int = 1020, method: str = "sink", config: StreamConfig | None = None
    ):
        super().__init__(layers=[])
        self.config = config or StreamConfig(num_sinks=num_sinks, window=window, method=method)
        self.policy = self.config.policy()
        self._memo: dict = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(SinkLayer(self.policy, len(self.layers), self._memo))
        waiting = HANDOFF.get()
        if waiting is not None and waiting.pending is not None:
            waiting.pending = None
            HANDOFF.set(None)
            raise NotPreparedError(
                "the model is not using streamllm's attention; call streamllm.prepare(model) before using SinkCache"
            )
        layer = self.layers[layer_idx]
        out = layer.update(key_states, value_states)
        HANDOFF.set(layer)
        return out

    def discard_pending(self) -> None:
        """Drop new keys left unattended by a forward pass that failed midway, so the next one starts clean."""
        for layer in self.layers:
            layer.pending = None
        HANDOFF.set(None)

    # -- the stream's view ------------------------------------------------------------------------------
    @property
    def tokens_seen(self) -> int:
        return self.layers[0].seen if self.layers else 0

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else 0

    def __len__(self) -> int:
        return len(self.layers)

    def cache_length(self) -> int:
        """Tokens held now by the fullest layer (the number a user watches stay flat)."""
        return max((layer.length for layer in self.layers), default=0)

    def position_ids(self, num_new: int) -> torch.Tensor:
        """The positions to hand the model for the next ``num_new`` tokens. (1, T)"""
        start = self.tokens_seen - self.offset
        return torch.arange(start, start + num_new).unsqueeze(0)

    def maybe_rebase(self, num_new: int) -> None:
        """Keep positions handed to the model below ``cache_size + rebase_every`` (float32 rotary stays exact)."""
        cap = self.policy.capacity
        if cap is None or not self.layers:
            return
        virtual_end = self.tokens_seen - self.offset + num_new
        if virtual_end <= cap + self.config.rebase_every:
            return
        shift = self.tokens_seen - self.offset - cap
        if shift > 0:
            log.debug("rebasing window keys by %d positions", shift)
            for layer in self.layers:
                layer.rebase(shift)

    def state_dict(self) -> dict:
        """Everything needed to continue this stream later: one ``SinkLayer.state_dict`` per layer."""
        return {"layers": [layer.state_dict() for layer in self.layers]}

    def load_state_dict(self, state: dict, inv_freqs: list[torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned; ``inv_freqs`` are the prepared model's rotary frequencies per
        layer (``streamllm.arch.layer_inv_freqs(model)``)."""
        layers = state["layers"]
        if layers and len(layers) != len(inv_freqs):
            raise ValueError(f"the state has {len(layers)} layers, the model {len(inv_freqs)}")
        self.layers = []
        for idx, layer_state in enumerate(layers):
            layer = SinkLayer(self.policy, idx, self._memo)
            layer.load_state_dict(layer_state, inv_freqs[idx])
            self.layers.append(layer)

    def memory_bytes(self) -> int:
        return sum(
            layer.full_keys.nbytes + layer.full_values.nbytes
            for layer in self.layers
            if layer.full_keys is not None
        )
