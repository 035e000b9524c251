"""``KVCache``: the keys and values of one stream, per layer, under per-layer policies fixed when it is made.

The cache owns positions. For the next T tokens, ``plan(T)`` makes one ``Plan`` per policy (layers that share a
policy share it): what the backends need to attend. ``commit`` is the one place where tokens enter and leave a
layer's storage: the tokens that leave are handed to ``on_evict`` (where a policy or a memory can keep them), then
the new tokens that stay are written into their slots. Once every layer has committed, the stream has seen the
T tokens.

Storage per layer (``store.py``, in the model's dtype or as 8-bit integers with a scale per token and kv head):
keys and values of ``capacity`` slots (an unbounded policy grows them), followed by a scratch slot where the C++
decode step puts the token being decoded, and the slots of the keys recalled from memory.
Window keys are stored rotated at their *model* position (text position minus ``offset``) and never touched
again; anchored keys (the sinks) at 0..S-1 (``docs/design.md``: the distance from a query to a window key is the
same in the cache as in the text). Every ``rebase_every`` tokens past the capacity, the window keys are turned
back and ``offset`` grows, so the positions handed to the model stay small and float32 rotary stays exact. An
8-bit store turns them back as numbers in the model's dtype and quantizes them again; with the default
``rebase_every`` (4096) above the window, a key is turned at most once while it is held.

Letters: B batch, Hkv kv heads, T new tokens, C slots, D head dim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import snapshot
from .memory import Memory
from .plan import Plan, Ring, RingPlan, make_plan
from .policy import Policy
from .rotary import rotate
from .store import KV_DTYPES, LayerStore

log = logging.getLogger(__name__)


class NotPreparedError(RuntimeError):
    """A model ran with a cache but did not attend through it (it was not prepared with ``streamllm.prepare``)."""


@dataclass(frozen=True)
class Evicted:
    """Tokens leaving one layer's cache: text positions (N,), keys and values (B, Hkv, N, D) as stored (window keys
    rotated at text position - ``offset``, anchored ones at 0..S-1)."""

    layer: int
    positions: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    offset: int


class KVCache:
    """A stream's cache: one ``LayerStore`` per layer, the count of tokens seen and the rebasing offset.

    ``policies`` and ``inv_freqs`` give each layer's policy and rotary frequencies (``for_model`` reads them off a
    model). ``on_evict`` receives an ``Evicted`` for every layer and batch of tokens that leave.
    ``position_limit``: model positions must stay below it (a rotary whose frequencies change past the model's
    original context); rebasing comes early enough, and a piece too long to fit is refused. ``kv_dtype``: "model"
    keeps keys and values in the model's dtype, "int8" as 8-bit integers with a scale per token and kv head
    (``store.py``)."""

    def __init__(
        self,
        policies: Sequence[Policy],
        inv_freqs: Sequence[torch.Tensor],
        rebase_every: int | None = 4096,
        on_evict: Callable[[Evicted], None] | None = None,
        memory: Memory | None = None,
        position_limit: int | None = None,
        kv_dtype: str = "model",
    ):
        if len(policies) != len(inv_freqs):
            raise ValueError(f"{len(policies)} policies for {len(inv_freqs)} layers")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        recall = [
            memory.config.recalled if memory and i in memory.layers else 0 for i in range(len(policies))
        ]
        self.kv_dtype = kv_dtype
        self.layers = [
            LayerStore(policy, freq, slots, kv_dtype)
            for policy, freq, slots in zip(policies, inv_freqs, recall, strict=True)
        ]
        distinct = list(dict.fromkeys(policies))  # layers of one policy share one plan
        self.groups = [[i for i, p in enumerate(policies) if p == policy] for policy in distinct]
        self._group_of = [distinct.index(p) for p in policies]
        # The policy of the model's global layers (the largest; the first layer's when every layer is local).
        self.policy = max(distinct, key=lambda p: (p.capacity is None, p.capacity or 0, p.num_sinks))
        self.uniform = len(distinct) == 1  # every layer has the same policy: one plan serves them all
        self.rebase_every = rebase_every
        self.position_limit = position_limit
        self.on_evict = on_evict
        self.memory = memory  # keeps what leaves the memory layers and recalls it (``memory.py``)
        self.seen = 0  # tokens processed: the next token's text position
        self.offset = 0  # model position = text position - offset (window keys are rotated at it)
        self.plans: list[Plan] | None = None  # the pending plan of every layer, until all have committed
        self._departing: tuple | None = None  # (plan, what leaves under it), for the layers that share it
        self.uncommitted = 0
        self._rings: dict[int, Ring] = {}  # per policy group that is a ring, filling or full (``_ring``)
        # per policy group, the slots written since the last ``mark_saved`` (None: all of them may differ)
        self.changed: list[torch.Tensor | None] = [None] * len(self.groups)

    # -- the stream's view ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def cache_length(self) -> int:
        """Tokens held now by the fullest layer (the number a user watches stay flat). Layers of one policy hold
        the same positions, so one layer per policy is counted."""
        return max((self.layers[group[0]].length for group in self.groups), default=0)

    def memory_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def position_ids(self) -> torch.Tensor:
        """The positions to hand the model for the planned tokens. (1, T)"""
        return self._pending()[0].model_pos[None]

    def _pending(self) -> list[Plan]:
        """Every layer's pending plan; refuses where no tokens are planned."""
        if self.plans is None:
            raise RuntimeError("no tokens are planned; call plan(T) first")
        return self.plans

    # -- the contract --------------------------------------------------------------------------------------------
    def plan(self, T: int) -> list[Plan]:
        """Plan the next ``T`` tokens: one ``Plan`` per layer, shared by layers of one policy."""
        if self.plans is not None:
            raise NotPreparedError(
                "the previous forward pass did not attend through the cache in every layer; call "
                "streamllm.prepare(model) before streaming, and reset the stream after a failed pass"
            )
        if T < 1:
            raise ValueError("nothing to plan")
        limit, cap = self.position_limit, self.policy.capacity
        if limit is not None and (cap is None or self.rebase_every is None) and self.seen + T > limit:
            raise ValueError(
                f"position {self.seen + T - 1} is past {limit - 1}, the last this model's rotary keeps its "
                "frequencies at; streamllm.Stream keeps positions below it by rebasing"
            )
        if limit is not None and cap is not None and cap + T > limit:
            raise ValueError(
                f"{T} tokens at once would take model positions past {limit - 1}, the last this model's rotary "
                f"keeps its frequencies at; feed at most {limit - cap} at a time"
            )
        # the memory layers' (recalled, anchor_extra, select) for ``make_plan``
        recall: tuple[int, int, bool] | None = None
        if self.memory is not None:
            if self.memory.next_point(self.seen) < self.seen + T:
                raise ValueError(
                    f"tokens {self.seen}..{self.seen + T - 1} span a memory selection point; "
                    "split them there (streamllm's forward does)"
                )
            select, M = self.memory.start(self.seen)
            recall = (M, self.memory.extra_anchor(), select)
        self._maybe_rebase(T)
        made: list[Plan] = []
        for g, group in enumerate(self.groups):
            first = self.layers[group[0]]
            if first.policy.capacity is None and first.keys is not None:
                self._grow(group, first.length + T)
            extra = recall if self.memory is not None and group[0] in self.memory.layers else None
            ring = self._ring(g) if T == 1 and extra is None else None
            if ring is not None:
                made.append(ring.plan(first.policy, first.slot_pos, self.offset))
            else:
                made.append(
                    make_plan(first.policy, first.slot_pos, self.seen, self.offset, T, *(extra or ()))
                )
        self._group_plans = made
        self.plans = [made[g] for g in self._group_of]
        self.uncommitted = len(self.layers)
        return self.plans

    def commit(
        self, layer_idx: int, k_new: torch.Tensor | None, v_new: torch.Tensor | None, written: bool = False
    ) -> None:
        """Carry out layer ``layer_idx``'s plan once its attention has run: hand the tokens that leave (stored
        ones and new ones that do not stay) to ``on_evict``, then write the new keys and values (B, Hkv, T, D)
        that stay into their slots.

        ``written``: the backend has stored them at the plan's slots itself, in the same pass as attending (the
        C++ step does), and passes None for them. It may do so only when there is no ``on_evict``, which must see a
        leaving token before its slot is overwritten."""
        plan = self._pending()[layer_idx]
        store = self.layers[layer_idx]
        if written:
            if self.hooked and plan.departures:
                raise RuntimeError("a backend wrote over the slots of tokens that on_evict had not seen yet")
        elif k_new is None or v_new is None:
            raise ValueError(
                "commit takes the new keys and values unless the backend wrote them (written=True)"
            )
        else:
            if self.hooked and plan.departures:
                self._evict(layer_idx, plan, k_new, v_new)
            if plan.last_slot >= 0:
                if store.keys is None or plan.last_slot >= store.keys.shape[2]:
                    store.allocate(k_new, self.size_for(store.policy, plan.last_slot + 1, store))
                stays = plan.stays  # plans live on the CPU; the storage may not
                if not plan.all_stay:
                    stays = stays if k_new.is_cpu else stays.to(k_new.device)
                    k_new, v_new = k_new[:, :, stays], v_new[:, :, stays]
                store.write(plan.stay_slots, k_new, v_new)
        self.uncommitted -= 1
        if self.uncommitted == 0:
            self._finish()

    def _ring(self, g: int) -> Ring | None:
        """Policy group ``g``'s ``Ring`` where it is one (filling or full), kept from token to token while its plans'
        commits write the group's one ``slot_pos`` in place; None elsewhere."""
        ring = self._rings.get(g)
        if ring is not None and ring.seen == self.seen:
            return ring
        group = self.groups[g]
        first = self.layers[group[0]]
        ring = Ring.of(first.policy, first.slot_pos, self.seen)
        if ring is None:
            self._rings.pop(g, None)
            return None
        for i in group:  # (equal already) one tensor for the group, so that writing it serves every layer
            self.layers[i].slot_pos = first.slot_pos
        self._rings[g] = ring
        return ring

    def commit_written(self) -> None:
        """``commit(i, None, None, written=True)`` for every layer at once: the backend stored each layer's new
        tokens at the plan's slots itself (the C++ step does). Only without an eviction hook."""
        if self.hooked:
            raise RuntimeError("a backend wrote over the slots of tokens that on_evict had not seen yet")
        if self.plans is None or self.uncommitted != len(self.layers):
            raise RuntimeError("commit_written carries out a whole plan that no layer has committed yet")
        self.uncommitted = 0
        self._finish()

    def recall(self, layer_idx: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The recalled keys and values (1, Hkv, M, D) layer ``layer_idx`` attends to besides its plan's, or None.
        At a selection point the layer first selects them with the query (1, H, T, D) of the first token."""
        plan = self._pending()[layer_idx]
        if not plan.recalled or self.memory is None:
            return None
        if plan.select:  # into the scratch slots, where the C++ decode step reads them too
            pos = int(plan.model_pos[0])
            keys, values = self.memory.select(layer_idx, query[:, :, 0], pos, pos + int(plan.anchor_shift[0]))
            return self.recall_into(layer_idx, keys, values)
        return self.recall_into(layer_idx)

    def recall_into(
        self, i: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s recall scratch slots (after the decoded token's), filled with ``keys`` and ``values``
        when given: -> the M slots in use."""
        if self.memory is None:
            raise RuntimeError("this cache keeps no memory")
        store = self.layers[i]
        start = store.slot_pos.numel() + 1
        end = start + self.memory.recalled_len
        if keys is not None:
            store.write(slice(start, end), keys, values)
        return store.read(slice(start, end))

    def split_points(self, start: int, T: int) -> list[int]:
        """Where tokens ``start .. start + T - 1`` must be split so that no piece spans a memory selection point
        and every piece fits below ``position_limit``: the offsets (0 < o < T), ascending."""
        cuts = set()
        if self.memory is not None:
            at = start
            while (at := self.memory.next_point(at)) < start + T:
                cuts.add(at - start)
        cap = self.policy.capacity
        if self.position_limit is not None and cap is not None:
            room = self.position_limit - cap
            cuts.update(range(room, T, room))  # pieces that cross a memory point only get shorter
        return sorted(cuts)

    @property
    def hooked(self) -> bool:
        """Whether leaving tokens go somewhere (``on_evict`` or the memory), so a backend may not overwrite their
        slots before the commit has handed them on."""
        return self.on_evict is not None or self.memory is not None

    def abandon(self) -> None:
        """Forget a plan whose forward pass failed midway. Layers that committed already hold the new tokens, so
        the stream is unusable until it is reset; this only lets the next call say so clearly."""
        self.plans = None
        self._departing = None
        self.uncommitted = 0
        self._rings = {}

    def _finish(self) -> None:
        """Every layer committed: record what each slot now holds, and the new count of tokens seen."""
        for g, (group, plan) in enumerate(zip(self.groups, self._group_plans, strict=True)):
            if isinstance(plan, RingPlan):  # one token into its ring's slot, in the group's one slot_pos
                slot_pos = self.layers[group[0]].slot_pos
                slot_pos[plan.last_slot] = plan.seen - 1
                if not self._rings[g].advance(plan, slot_pos.numel()):
                    del self._rings[g]
            else:
                slot_pos = self.layers[group[0]].slot_pos.clone()  # (C,), grown with the storage if it grew
                if plan.departures:
                    slot_pos[: plan.leaving.numel()][plan.leaving] = -1
                slot_pos[plan.stay_slots] = plan.text_pos[plan.stays]
                for i in group:
                    self.layers[i].slot_pos = slot_pos
            changed = self.changed[g]
            if changed is not None:
                if changed.numel() < slot_pos.numel():  # the storage grew
                    grown = torch.ones(slot_pos.numel() - changed.numel(), dtype=torch.bool)
                    changed = self.changed[g] = torch.cat([changed, grown])
                changed[plan.last_slot if isinstance(plan, RingPlan) else plan.stay_slots] = True
        self.seen = self._pending()[0].seen
        self.plans = None
        self._departing = None

    def _evict(self, i: int, plan: Plan, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        store = self.layers[i]
        leaving, gone, pos = self._departures(plan, store)
        parts = []
        if leaving is not None:
            parts.append(store.read(leaving))
        if gone is not None:
            on = gone if k_new.is_cpu else gone.to(k_new.device)
            parts.append((k_new.index_select(2, on), v_new.index_select(2, on)))
        if not parts:
            return
        # (B, Hkv, N, D) each
        keys = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=2)
        values = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=2)
        if self.memory is not None:
            self.memory.add(i, pos, keys, values, self.offset)
        if self.on_evict is not None:
            self.on_evict(Evicted(i, pos, keys.clone(), values.clone(), self.offset))

    def _departures(
        self, plan: Plan, store: LayerStore
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(stored slots that leave, new tokens that do not stay, the text positions of both), worked out once
        per plan: every layer that shares the plan (and its slot positions) hands on the same slots."""
        if self._departing is not None and self._departing[0] is plan:
            return self._departing[1]
        leaving = plan.leaving.nonzero().flatten() if bool(plan.leaving.any()) else None
        gone_mask = ~plan.stays
        gone = gone_mask.nonzero().flatten() if bool(gone_mask.any()) else None
        pos = [store.slot_pos[leaving]] if leaving is not None else []
        pos += [plan.text_pos[gone]] if gone is not None else []
        out = (leaving, gone, torch.cat(pos) if pos else torch.empty(0, dtype=torch.long))
        self._departing = (plan, out)
        return out

    def size_for(self, policy: Policy, need: int, store: LayerStore) -> int:
        if policy.capacity is not None:
            return max(policy.capacity, need)
        return max(need, 2 * store.slot_pos.numel(), 256)  # an unbounded cache grows by doubling

    def _grow(self, group: list[int], need: int) -> None:
        for i in group:
            store = self.layers[i]
            if need > store.slot_pos.numel() and store.keys is not None:
                store.allocate(store.keys, self.size_for(store.policy, need, store))

    # -- rebasing ------------------------------------------------------------------------------------------------
    def _maybe_rebase(self, T: int) -> None:
        """Keep model positions below ``capacity + rebase_every`` (and ``position_limit``): turn the window keys
        back by the excess."""
        cap = self.policy.capacity
        if cap is None or self.rebase_every is None:
            return
        bound = cap + self.rebase_every
        if self.position_limit is not None:
            bound = min(bound, self.position_limit)
        if self.seen - self.offset + T <= bound:
            return
        shift = self.seen - self.offset - cap
        if shift <= 0:
            return
        log.debug("rebasing window keys by %d positions", shift)
        for store in self.layers:
            if store.keys is not None:
                ring = slice(store.policy.num_sinks, store.slot_pos.numel())  # anchored keys: slots 0..S-1
                keys, _ = store.read(ring)  # (B, Hkv, C - S, D)
                delta = torch.full((keys.shape[2],), -shift, dtype=torch.long)
                store.write(ring, rotate(keys, delta, store.inv_freq))
        self.offset += shift
        self.changed = [None] * len(self.groups)  # every window key turned

    # -- saving and restoring (``snapshot.py``) -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue this stream later, per layer (``snapshot.state_dict``)."""
        return snapshot.state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned into this (fresh) cache; the policies must be the same."""
        self._resume(*snapshot.load_state_dict(self, state))
        self.changed = [None] * len(self.groups)

    def changes(self) -> dict | None:
        """What changed since ``mark_saved`` (``snapshot.changes``), or None where everything may have."""
        changed = [c for c in self.changed if c is not None]
        if len(changed) < len(self.changed):
            return None
        return snapshot.changes(self, [changed[g] for g in self._group_of], self._group_of)

    def load_changes(self, state: dict) -> None:
        """Apply what ``changes`` returned to the cache it was taken from, as it was when last saved."""
        self._resume(*snapshot.load_changes(self, state))

    def _resume(self, seen: int, offset: int) -> None:
        """Go on from restored layers: ``seen`` tokens, rotated at ``offset``; a ring is found again on the next
        token."""
        self.seen, self.offset = seen, offset
        self._rings = {}

    def mark_saved(self) -> None:
        """The cache as it is now is saved: ``changes`` counts from here."""
        self.changed = [
            torch.zeros(self.layers[g[0]].slot_pos.numel(), dtype=torch.bool) for g in self.groups
        ]
