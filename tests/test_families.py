"""The families beyond the first table, on tiny random models: each streams exactly (the model's own forward
below capacity, the oracle past it, with and without memory). And for every family and rope type: the rotation
streamllm applies to move a key is the one the model itself applies, layer by layer, which is what the oracle
cannot check (it uses the same rotation)."""

import pytest
import torch
from helpers import assert_memory_matches_oracle, engine_logits
from oracle import oracle_logits
from tiny import ARCHS, FAMILIES, ROPE_VARIANTS, tiny_family_model, tiny_model, tiny_rope_model
from transformers import AttentionInterface

import streamllm
from streamllm import StreamConfig
from streamllm.backends.arch import shape_of
from streamllm.core.rotary import rotate

S, W = 2, 14


def _ids(n, seed=1):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


_KEYS: dict[int, torch.Tensor] = {}


def _record_keys(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Keeps each layer's rotated keys and attends to nothing, so that no layer's input depends on position."""
    _KEYS[module.layer_idx] = key.detach().clone()
    return torch.zeros_like(query).transpose(1, 2), None


AttentionInterface.register("streamllm_test_keys", _record_keys)


def _any_model(name: str):
    kind, _, which = name.partition(":")
    return {"arch": tiny_model, "family": tiny_family_model, "rope": tiny_rope_model}[kind](which)


@pytest.mark.parametrize(
    "name",
    [f"arch:{a}" for a in ARCHS] + [f"family:{f}" for f in FAMILIES] + [f"rope:{r}" for r in ROPE_VARIANTS],
)
def test_rotate_moves_keys_as_the_model_does(name):
    model = _any_model(name)
    freqs, order = shape_of(model).inv_freqs, shape_of(model).rotary_order
    model.set_attn_implementation("streamllm_test_keys")
    keys = {}
    for pos in (3, 40):  # below every original context in tiny.py
        _KEYS.clear()
        with torch.no_grad():
            model(input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[pos]]), use_cache=False)
        keys[pos] = {i: k if order is None else k[..., order] for i, k in _KEYS.items()}
    assert len(keys[3]) == len(freqs)
    for i, k in keys[3].items():
        moved = rotate(k, torch.tensor([37]), freqs[i])
        assert (moved - keys[40][i]).abs().max() < 1e-5, f"layer {i}"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return streamllm.prepare(tiny_family_model(request.param))


def test_family_streams_exactly(family):
    ids = _ids(40)
    family.set_attn_implementation("eager")
    with torch.no_grad():
        own = family(input_ids=torch.tensor([ids[: S + W]])).logits[0].float()
    streamllm.prepare(family)
    with torch.no_grad():  # a plain forward of a prepared model (no cache) is the model's own
        plain = family(input_ids=torch.tensor([ids[: S + W]])).logits[0].float()
    assert (plain - own).abs().max() < 1e-4
    below, _ = engine_logits(family, ids[: S + W], StreamConfig(num_sinks=S, window=W), S + W)
    assert (below - own).abs().max() < 1e-4
    ref = oracle_logits(family, ids, S, W)
    for chunk in (1, 5):
        got, _ = engine_logits(family, ids, StreamConfig(num_sinks=S, window=W), chunk)
        assert (got - ref).abs().max() < 1e-4, chunk


def test_family_memory_matches_oracle(family):
    assert_memory_matches_oracle(family, _ids(44, seed=2), S, W)
