"""Saving a cache whole, or only what changed since it was last saved (``core/snapshot.py``)."""

import copy

import pytest
import torch
from tiny import tiny_model

from streamllm import StreamConfig
from streamllm.runtime.stream import Stream

CONFIGS = {
    "sink": StreamConfig(num_sinks=2, window=9, rebase_every=400),
    "two-policies": StreamConfig(
        num_sinks=2, window=20, rebase_every=400
    ),  # gemma3: sliding and global layers
    "sink-int8": StreamConfig(num_sinks=2, window=9, rebase_every=400, kv_dtype="int8"),
    "dense": StreamConfig(method="dense"),  # its storage grows between saves
}  # a memory's changes go through its file: the server's tests save and restore one


def _ids(n, seed=0):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("one_by_one", [False, True], ids=["chunks", "decoded"])
def test_a_saved_state_and_its_changes_continue_exactly(name, one_by_one):
    """A whole state, then two sets of changes, restored into a fresh cache: it continues bit for bit. Each set
    holds only the slots written since the save before it, whether the tokens came as a chunk or were decoded one
    at a time (a full ring's steady plans)."""
    model = tiny_model("gemma3_text" if name == "two-policies" else "llama")
    config = CONFIGS[name]
    ids = _ids(80)
    live = Stream(model, config)
    assert live.cache.changes() is None  # nothing saved yet: everything
    live.feed(ids[:30])
    saved = [copy.deepcopy(live.cache.state_dict())]
    live.cache.mark_saved()
    for piece in (ids[30:37], ids[37:42]):
        for part in [[t] for t in piece] if one_by_one else [piece]:
            live.feed(part)
        changes = live.cache.changes()
        assert changes is not None
        owners = [i for i, layer in enumerate(changes["layers"]) if "slots" in layer]  # one per policy
        assert owners == ([0, 1] if name == "two-policies" else [0])
        assert all(changes["layers"][i]["slots"].numel() == len(piece) for i in owners)
        assert all(layer.get("positions_of", i) in owners for i, layer in enumerate(changes["layers"]))
        saved.append(copy.deepcopy(changes))
        live.cache.mark_saved()
    back = Stream(model, config)
    back.cache.load_state_dict(saved[0])
    for changes in saved[1:]:
        back.cache.load_changes(changes)
    assert back.tokens_seen == live.tokens_seen == 42
    for token in ids[42:60]:
        assert torch.equal(live.feed([token]), back.feed([token]))


def test_a_rebase_means_everything_changed():
    model = tiny_model("llama")
    stream = Stream(model, StreamConfig(num_sinks=2, window=9, rebase_every=5))
    stream.feed(_ids(12))
    stream.cache.mark_saved()
    stream.feed(_ids(2, seed=1))
    assert stream.cache.changes() is not None
    stream.feed(_ids(6, seed=2))  # past capacity + rebase_every: the window keys turn
    assert stream.cache.offset > 0 and stream.cache.changes() is None
