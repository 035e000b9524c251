"""The plan: everything a backend needs to process the next T tokens of one layer, computed once by the cache.

A plan is made from a policy, the text positions the layer's slots hold, how many tokens the stream has seen
and the rebasing offset. It says where the new tokens stand (their text positions and the positions the model
rotates them at), which stored and new keys each of them sees, which keys are anchored (the sinks) and how far the
query turns to see them, which slot each new token goes to, and which stored tokens leave. Backends (the
transformers attention function, the Python and C++ decode steps, the batched step) read it and nothing else;
``KVCache.commit`` carries it out. Derivation: ``docs/design.md``.

Letters: T new tokens, C stored slots, K = C + T keys (stored slots first, then the new tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cache, cached_property

import torch

from .policy import Policy


@dataclass(frozen=True)
class Plan:
    policy: Policy
    text_pos: torch.Tensor  # (T,) text positions of the new tokens
    model_pos: torch.Tensor  # (T,) positions the model rotates them at: text position - offset
    # (T,) how far each query turns to see the anchored keys: anchor - model position
    anchor_shift: torch.Tensor
    key_pos: torch.Tensor  # (K,) text position of each key (-1: an empty slot)
    # (K,) bool: keys stored at their anchor positions 0..S-1, seen by the turned query
    anchored: torch.Tensor
    visible: torch.Tensor  # (T, K) bool: what each query attends to
    slots: torch.Tensor  # (T,) slot each new token is stored in; -1 for one that leaves within these T tokens
    leaving: torch.Tensor  # (C,) bool: stored slots whose token leaves once the plan is committed
    seen: int  # tokens processed once the plan is committed
    # Derived once here, so that a commit (once per layer) does no tensor work but the writes:
    stays: torch.Tensor  # (T,) bool: the new tokens that stay (slots >= 0)
    stay_slots: torch.Tensor  # (T',) their slots
    last_slot: int  # the highest slot written (-1: none)
    all_stay: bool  # whether every new token stays
    departures: bool  # whether any token leaves (a stored one, or a new one within these T tokens)
    recalled: int = 0  # M: tokens recalled from memory, seen by every query from its anchor (``memory.py``)
    select: bool = False  # the first token selects what is recalled (a selection point of the memory)
    # what a backend derives once per plan
    memo: dict = field(default_factory=dict, compare=False, repr=False)
    steady: bool = False  # a ``RingPlan``: one token into a full ring, which sees every key it holds

    @property
    def numbers(self) -> tuple[int, int, int]:
        """The first token's slot, model position and anchor shift, as ints."""
        return int(self.slots[0]), int(self.model_pos[0]), int(self.anchor_shift[0])

    @property
    def turns(self) -> bool:
        """Whether any query sees an anchored key from a position other than its own."""
        return bool(self.anchored.any()) and bool((self.anchor_shift != 0).any())


def make_plan(
    policy: Policy,
    slot_pos: torch.Tensor,
    seen: int,
    offset: int,
    T: int,
    recalled: int = 0,
    anchor_extra: int = 0,
    select: bool = False,
) -> Plan:
    """The plan for tokens ``seen .. seen + T - 1`` of a layer whose slots hold ``slot_pos`` (C,) (-1: empty).
    ``recalled`` tokens from memory are seen besides, and move the anchor up by ``anchor_extra``.

    New tokens that stay take the free slots (empty, or freed by a token that leaves) in ascending order, then
    slots past C, which an unbounded cache grows into. The first S tokens of a stream always land in slots
    0..S-1, so anchored keys live there. (Decoding makes one plan per token, so this counts its operations.)"""
    end = seen + T
    C = slot_pos.numel()
    q = torch.arange(seen, end)  # (T,)
    key_pos = torch.cat([slot_pos, q])  # (K,)
    held = key_pos >= 0  # (K,)
    stays_all = held & policy.kept(key_pos, end)  # (K,): what the cache holds once the T tokens are in
    stays, new_stays = stays_all[:C], stays_all[C:]
    free = torch.cat([(~stays).nonzero().flatten(), torch.arange(C, C + T)])  # (C' + T,)
    n_stay = int(new_stays.sum())
    stay_slots = free[:n_stay]  # (T',) in the order of the staying tokens
    slots = torch.full((T,), -1, dtype=torch.long)
    slots[new_stays] = stay_slots
    leaving = held[:C] & ~stays  # (C,)
    model_pos = q - offset
    S = policy.num_sinks
    return Plan(
        policy=policy,
        text_pos=q,
        model_pos=model_pos,
        anchor_shift=policy.anchor(q) + anchor_extra - model_pos,
        key_pos=key_pos,
        anchored=held & (key_pos < S) if S else torch.zeros_like(held),
        visible=policy.visible(q, key_pos),
        slots=slots,
        leaving=leaving,
        seen=end,
        stays=new_stays,
        stay_slots=stay_slots,
        last_slot=int(stay_slots.max()) if n_stay else -1,
        all_stay=n_stay == T,
        departures=n_stay < T or bool(leaving.any()),
        recalled=recalled,
        select=select,
    )


def ring_order(policy: Policy, slot_pos: torch.Tensor, seen: int) -> list[int] | None:
    """The slots of the window's tokens, oldest first, where a layer whose slots hold ``slot_pos`` is in the
    steady state of a ring policy (``Policy.ring``) after ``seen`` tokens: every slot full, the sinks in slots
    0..S-1 and the W tokens before ``seen`` in the others. None where it is not (a young stream, another policy)."""
    W, S = policy.ring, policy.num_sinks
    C = slot_pos.numel()
    if W is None or C != S + W or seen < C:
        return None
    if S and not torch.equal(slot_pos[:S], torch.arange(S)):
        return None
    order = slot_pos[S:].argsort() + S  # (W,)
    if not torch.equal(slot_pos[order], torch.arange(seen - W, seen)):
        return None
    return order.tolist()


@cache
def _ring_constants(C: int, S: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every ring plan of C slots and S sinks shares (plans are read-only): anchored (C+1,), visible
    (1, C+1), stays (1,)."""
    anchored = torch.arange(C + 1) < S
    return anchored, torch.ones(1, C + 1, dtype=torch.bool), torch.ones(1, dtype=torch.bool)


class RingPlan(Plan):
    """``make_plan``'s plan for one token in the steady state of a ring (``ring_order``), given the slot of the
    token that leaves (the oldest of the window), which the new one takes. The token sees every slot.

    Decoding makes one of these per token, and the C++ step reads only its numbers (``numbers``), so its tensors
    are made when a backend first reads them: no tensor work per token. It is the same plan as ``make_plan``'s
    (tested field by field) as long as it is pending: the commit writes the new token's position into
    ``slot_pos``."""

    # (slot, model position, anchor shift) of the token, and the group's slot positions (C,)
    _numbers: tuple[int, int, int]
    _slot_pos: torch.Tensor

    def __init__(self, policy: Policy, slot_pos: torch.Tensor, seen: int, offset: int, slot: int):
        C = slot_pos.numel()
        assign = object.__setattr__.__get__(self)  # the plan is frozen; these are its own fields
        assign("policy", policy)
        assign("seen", seen + 1)
        assign("last_slot", slot)
        assign("all_stay", True)
        assign("departures", True)
        assign("memo", {})
        assign("steady", True)
        # the anchor of every query past the capacity is the capacity
        assign("_numbers", (slot, seen - offset, C - (seen - offset)))
        assign("_slot_pos", slot_pos)

    @property
    def numbers(self) -> tuple[int, int, int]:
        return self._numbers

    text_pos = cached_property(lambda self: torch.tensor([self.seen - 1]))
    model_pos = cached_property(lambda self: torch.tensor([self.numbers[1]]))
    anchor_shift = cached_property(lambda self: torch.tensor([self.numbers[2]]))
    key_pos = cached_property(lambda self: torch.cat([self._slot_pos, self.text_pos]))
    anchored = cached_property(lambda self: _ring_constants(self._slot_pos.numel(), self.policy.num_sinks)[0])
    visible = cached_property(lambda self: _ring_constants(self._slot_pos.numel(), self.policy.num_sinks)[1])
    stays = cached_property(lambda self: _ring_constants(self._slot_pos.numel(), self.policy.num_sinks)[2])
    slots = cached_property(lambda self: torch.tensor([self.last_slot]))
    stay_slots = cached_property(lambda self: self.slots)
    leaving = cached_property(lambda self: torch.arange(self._slot_pos.numel()) == self.last_slot)


def filling(policy: Policy, slot_pos: torch.Tensor, seen: int) -> bool:
    """Whether a layer whose slots hold ``slot_pos`` is a ring (``Policy.ring``) that is not full yet after ``seen``
    tokens, as ``make_plan`` fills one (empty slots in order): tokens 0..seen-1 in slots 0..seen-1, the rest empty."""
    W, S = policy.ring, policy.num_sinks
    C = slot_pos.numel()
    if W is None or C != S + W or not 0 < seen < C:
        return False
    return torch.equal(slot_pos[:seen], torch.arange(seen)) and bool((slot_pos[seen:] < 0).all())


class FillPlan(RingPlan):
    """``make_plan``'s plan for one token of a ring that is not full yet (``filling``): the token takes slot
    ``seen``, nothing leaves, and it sees every slot held (until the ring is full every token is kept) and itself;
    its anchor is its own position. Tensors made when read, as ``RingPlan``'s (tested field by field too)."""

    def __init__(self, policy: Policy, slot_pos: torch.Tensor, seen: int, offset: int):
        super().__init__(policy, slot_pos, seen, offset, seen)
        assign = object.__setattr__.__get__(self)
        assign("steady", False)
        assign("departures", False)
        assign("_numbers", (seen, seen - offset, offset))  # anchor q less model position q - offset

    def _first(self, n: int) -> torch.Tensor:
        """(C,) bool: the first n slots"""
        return torch.arange(self._slot_pos.numel()) < n

    visible = cached_property(
        lambda self: torch.cat([self._first(self.last_slot), torch.ones(1, dtype=torch.bool)])[None]
    )
    anchored = cached_property(
        lambda self: torch.cat(
            [
                self._first(min(self.last_slot, self.policy.num_sinks)),
                torch.tensor([self.last_slot < self.policy.num_sinks]),
            ]
        )
    )
    leaving = cached_property(lambda self: torch.zeros(self._slot_pos.numel(), dtype=torch.bool))


class Ring:
    """A policy group's ring kept between plans (``KVCache``): the slots of its window's tokens oldest first, or None
    while it fills, and the count of tokens seen they are right for. Worked out once from the slots' positions
    (``of``), then kept by the commit of each of its plans (``advance``)."""

    def __init__(self, order: list[int] | None, seen: int):
        self.order = None if order is None else deque(order)
        self.seen = seen

    @classmethod
    def of(cls, policy: Policy, slot_pos: torch.Tensor, seen: int) -> Ring | None:
        """The ring of a layer whose slots hold ``slot_pos``, where it fills (``filling``) or is full
        (``ring_order``); None elsewhere."""
        if policy.ring is None:
            return None
        order = ring_order(policy, slot_pos, seen)
        if order is None and not filling(policy, slot_pos, seen):
            return None
        return cls(order, seen)

    def plan(self, policy: Policy, slot_pos: torch.Tensor, offset: int) -> RingPlan:
        """The next token's plan: it takes the slot of the window's oldest token, or slot ``seen`` while filling."""
        if self.order is None:
            return FillPlan(policy, slot_pos, self.seen, offset)
        return RingPlan(policy, slot_pos, self.seen, offset, self.order[0])

    def advance(self, plan: RingPlan, C: int) -> bool:
        """``plan`` was committed: whether the ring is still right for the next token (one that has just filled
        its C slots is worked out again, as a full one)."""
        self.seen = plan.seen
        if self.order is None:
            return plan.seen < C
        self.order.rotate(-1)  # the slot of the token that left now holds the newest
        return True
