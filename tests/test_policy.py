"""Cache policy math on tiny tensors: which tokens survive, which positions they get."""

import pytest
import torch

from streamllm.config import ConfigError, StreamConfig
from streamllm.policy import Policy


def test_survivors_paper_example():
    # 4 sinks (tokens 0..3) and a window of 3: after 9 tokens the cache holds [0,1,2,3,6,7,8] ...
    p = Policy(4, 3)
    assert p.survivors(9) == [0, 1, 2, 3, 6, 7, 8]
    # ... and token 9 is decoded at in-cache position 7 (positions 0..7 in total).
    assert p.cache_positions(torch.tensor([9])).tolist() == [7]
    assert p.survivors(5) == [0, 1, 2, 3, 4]


def test_visible_sinks_window_and_self():
    p = Policy(2, 3)
    keys = torch.arange(10)
    row = p.visible(torch.tensor([9]), keys)[0]
    assert keys[row].tolist() == [0, 1, 6, 7, 8, 9]  # sinks, the 3 tokens before, itself
    assert not p.visible(torch.tensor([4]), keys)[0, 5:].any()  # never the future
    assert not p.visible(torch.tensor([4]), torch.tensor([-1]))[0, 0]  # empty slot


def test_dense_and_window_policies():
    assert Policy(0, None).survivors(50) == list(range(50))
    assert StreamConfig(num_sinks=4, window=4, method="window").policy() == Policy(0, 8)
    assert StreamConfig(num_sinks=4, window=4, method="dense").policy().capacity is None


def test_ring_slots_are_distinct_for_survivors():
    p = Policy(4, 5)
    surv = torch.tensor(p.survivors(100))
    slots = p.slot_of(surv)
    assert sorted(slots.tolist()) == list(range(9))
    assert slots[:4].tolist() == [0, 1, 2, 3]


def test_kept_after():
    p = Policy(2, 3)
    pos = torch.arange(10)
    assert pos[p.kept_after(pos, 10)].tolist() == [0, 1, 7, 8, 9]


def test_sliding_layer_policy():
    p = Policy(4, 1020)
    assert p.for_layer(None) == p
    assert p.for_layer(512) == Policy(0, 511)  # the model's own local window, no sinks
    assert Policy(4, 60).for_layer(512) == Policy(0, 64)  # never more than the cache budget


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_sinks=-1), dict(window=0), dict(method="nope"), dict(chunk_size=0), dict(window=2.5)],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        StreamConfig(**kwargs)
