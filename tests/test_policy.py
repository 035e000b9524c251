"""Cache policy and plan math on tiny tensors: which tokens survive, where they are stored, what a query sees."""

import pytest
import torch

from streamllm.config import ConfigError, StreamConfig
from streamllm.core.plan import FillPlan, RingPlan, filling, make_plan, ring_order
from streamllm.core.policy import DensePolicy, SinkPolicy, WindowPolicy


def _held(policy, seen):
    pos = torch.arange(seen)
    return pos[policy.kept(pos, seen)].tolist()


def test_survivors_paper_example():
    # 4 sinks (tokens 0..3) and a window of 3: after 9 tokens the cache holds [0,1,2,3,6,7,8] ...
    p = SinkPolicy(4, 3)
    assert _held(p, 9) == [0, 1, 2, 3, 6, 7, 8]
    # ... and token 9 is decoded at in-cache position 7 (positions 0..7 in total).
    assert p.anchor(torch.tensor([9])).tolist() == [7]
    assert _held(p, 5) == [0, 1, 2, 3, 4]


def test_visible_sinks_window_and_self():
    p = SinkPolicy(2, 3)
    keys = torch.arange(10)
    row = p.visible(torch.tensor([9]), keys)[0]
    assert keys[row].tolist() == [0, 1, 6, 7, 8, 9]  # sinks, the 3 tokens before, itself
    assert not p.visible(torch.tensor([4]), keys)[0, 5:].any()  # never the future
    assert not p.visible(torch.tensor([4]), torch.tensor([-1]))[0, 0]  # empty slot


def test_dense_and_window_policies():
    assert _held(DensePolicy(), 50) == list(range(50))
    assert StreamConfig(num_sinks=4, window=4, method="window").policy() == WindowPolicy(8)
    assert _held(WindowPolicy(8), 20) == list(range(12, 20))
    assert StreamConfig(num_sinks=4, window=4, method="dense").policy().capacity is None


def _stream_plans(policy, n, chunk):
    """Plan and carry out ``n`` tokens in chunks, as the cache does; returns the slot layout."""
    slot_pos = torch.empty(0, dtype=torch.long)
    seen = 0
    while seen < n:
        T = min(chunk, n - seen)
        plan = make_plan(policy, slot_pos, seen, 0, T)
        size = max(slot_pos.numel(), int(plan.slots.max()) + 1, policy.capacity or 0)
        grown = torch.full((size,), -1, dtype=torch.long)
        grown[: slot_pos.numel()] = slot_pos
        grown[: plan.leaving.numel()][plan.leaving] = -1
        grown[plan.stay_slots] = plan.text_pos[plan.stays]
        slot_pos, seen = grown, plan.seen
    return slot_pos


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_plans_keep_exactly_the_survivors_in_distinct_slots(chunk):
    p = SinkPolicy(4, 5)
    slot_pos = _stream_plans(p, 100, chunk)
    assert sorted(slot_pos[slot_pos >= 0].tolist()) == _held(p, 100)
    assert slot_pos.numel() == p.capacity
    assert slot_pos[:4].tolist() == [0, 1, 2, 3]  # anchored tokens live in slots 0..S-1


def test_a_decode_plan_reuses_the_slot_of_the_token_that_leaves():
    p = SinkPolicy(2, 3)
    slot_pos = torch.tensor([0, 1, 5, 6, 4])  # after 7 tokens: sinks 0, 1 and the window 4, 5, 6
    plan = make_plan(p, slot_pos, 7, 0, 1)
    assert plan.leaving.tolist() == [False, False, False, False, True]  # token 4 leaves once 7 is processed
    assert plan.slots.tolist() == [4]
    assert plan.key_pos[plan.visible[0]].tolist() == [0, 1, 5, 6, 4, 7]  # it still sees token 4
    assert plan.anchored.tolist() == [True, True, False, False, False, False]
    assert plan.anchor_shift.tolist() == [5 - 7]  # seen from in-cache position 5, rotated at 7


PLAN_FIELDS = (
    "text_pos",
    "model_pos",
    "anchor_shift",
    "key_pos",
    "anchored",
    "visible",
    "slots",
    "leaving",
    "seen",
    "stays",
    "stay_slots",
    "last_slot",
    "all_stay",
    "departures",
    "recalled",
    "select",
)


@pytest.mark.parametrize("policy", [SinkPolicy(4, 5), SinkPolicy(0, 6), WindowPolicy(7), SinkPolicy(2, 3)])
@pytest.mark.parametrize("chunk", [1, 4])
def test_a_steady_ring_plan_is_the_general_plan(policy, chunk):
    # after a fill in chunks (which leave the ring out of order), every decoded token's ring plan equals make_plan's
    filled = 2 * policy.capacity + 3
    slot_pos = _stream_plans(policy, filled, chunk)
    order = ring_order(policy, slot_pos, filled)
    assert sorted(order) == list(range(policy.num_sinks, policy.capacity))
    for seen in range(filled, filled + 2 * policy.capacity):
        assert order == ring_order(policy, slot_pos, seen)  # kept by turning it, as the cache does
        for offset in (0, 5):
            general, ring = (
                make_plan(policy, slot_pos, seen, offset, 1),
                RingPlan(policy, slot_pos, seen, offset, order[0]),
            )
            assert ring.steady and not general.steady
            _same_plan(general, ring)
        slot_pos = slot_pos.clone()
        slot_pos[order[0]] = seen
        order = order[1:] + order[:1]


def test_commit_written_carries_out_a_whole_plan_only():
    from streamllm.core.cache import KVCache

    inv = [torch.ones(2)] * 3
    cache = KVCache([SinkPolicy(1, 2)] * 3, inv)
    k = torch.zeros(1, 1, 1, 4)
    cache.plan(1)
    for i in range(3):  # the storage, made by ordinary commits
        cache.commit(i, k, k)
    cache.plan(1)
    cache.commit(0, k, k)
    with pytest.raises(RuntimeError, match="whole plan"):
        cache.commit_written()
    hooked = KVCache([SinkPolicy(1, 2)] * 3, inv, on_evict=lambda e: None)
    hooked.plan(1)
    with pytest.raises(RuntimeError, match="on_evict"):
        hooked.commit_written()


def _same_plan(general, fast):
    for name in PLAN_FIELDS:
        a, b = getattr(general, name), getattr(fast, name)
        same = torch.equal(a, b) and a.dtype == b.dtype if isinstance(a, torch.Tensor) else a == b
        assert same, (name, a, b)
    assert fast.numbers == general.numbers


@pytest.mark.parametrize("policy", [SinkPolicy(4, 5), SinkPolicy(0, 6), WindowPolicy(7), SinkPolicy(2, 3)])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_a_filling_ring_plan_is_the_general_plan(policy, chunk):
    # a ring filled by chunks and tokens (the first token makes the storage: no plan of its own), for every
    # count of tokens until it is full
    for seen in range(1, policy.capacity):
        slot_pos = _stream_plans(policy, seen, chunk)
        assert filling(policy, slot_pos, seen)
        for offset in (0, 3):
            fill = FillPlan(policy, slot_pos, seen, offset)
            assert not fill.steady
            _same_plan(make_plan(policy, slot_pos, seen, offset, 1), fill)
    full = _stream_plans(policy, policy.capacity, chunk)
    assert (
        not filling(policy, full, policy.capacity) and ring_order(policy, full, policy.capacity) is not None
    )


def test_a_ring_order_only_where_the_ring_is_steady():
    p = SinkPolicy(2, 3)
    assert ring_order(p, torch.tensor([0, 1, 2, 3, -1]), 4) is None  # not full yet
    assert ring_order(p, torch.tensor([0, 1, 5, 6, 4]), 7) == [4, 2, 3]
    assert ring_order(p, torch.tensor([0, 1, 5, 6, 4]), 8) is None  # token 7 missing
    assert ring_order(p, torch.tensor([1, 0, 5, 6, 4]), 7) is None  # sinks out of their slots
    assert ring_order(SinkPolicy(2, 3, text_positions=True), torch.tensor([0, 1, 5, 6, 4]), 7) is None
    assert ring_order(DensePolicy(), torch.arange(5), 5) is None
    assert filling(p, torch.tensor([0, 1, 2, -1, -1]), 3)
    assert not filling(p, torch.tensor([0, 1, -1, 2, -1]), 3)  # out of order: make_plan plans it
    assert not filling(p, torch.tensor([0, 1, 2, 3, 4]), 5)  # full


def test_a_chunk_plan_hides_what_each_token_would_not_see():
    p = SinkPolicy(1, 2)
    plan = make_plan(p, torch.tensor([0, 1, 2]), 3, 0, 3)  # tokens 3, 4, 5 after 0, 1, 2
    rows = [plan.key_pos[v].tolist() for v in plan.visible]
    assert rows == [[0, 1, 2, 3], [0, 2, 3, 4], [0, 3, 4, 5]]
    assert plan.slots.tolist() == [-1, 1, 2]  # token 3 leaves within the chunk
    assert plan.leaving.tolist() == [False, True, True]


def test_rebasing_offset_moves_model_positions_only():
    p = SinkPolicy(2, 3)
    plan = make_plan(p, torch.tensor([0, 1, 5, 6, 4]), 7, 3, 1)
    assert plan.model_pos.tolist() == [4] and plan.text_pos.tolist() == [7]
    assert plan.anchor_shift.tolist() == [5 - 4]


def test_sliding_layer_policy():
    p = SinkPolicy(4, 1020)
    assert p.for_layer(None) == p
    assert p.for_layer(512) == WindowPolicy(511)  # the model's own local window, no sinks
    assert SinkPolicy(4, 60).for_layer(512) == WindowPolicy(64)  # never more than the cache budget


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_sinks=-1), dict(window=0), dict(method="nope"), dict(chunk_size=0), dict(window=2.5)],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        StreamConfig(**kwargs)
