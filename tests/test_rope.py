"""Every rope type transformers 5 ships, on a tiny Llama: streamed exactly (checked against the model's own forward
below capacity and the oracle past it, through transformers and through the fast decode step), or refused."""

import pytest
import torch
import transformers as tf
from helpers import assert_memory_matches_oracle, engine_logits
from oracle import oracle_logits
from tiny import ROPE_VARIANTS, tiny_model, tiny_rope_model

import streamllm
from streamllm import StreamConfig, UnsupportedModelError
from streamllm.backends.arch import position_limit
from streamllm.backends.hf import cache_for, forward
from streamllm.runtime.stream import Stream

S, W = 2, 14
N = 110  # more than twice the original context of the length-dependent ones


@pytest.fixture(scope="module", params=list(ROPE_VARIANTS))
def model(request):
    return streamllm.prepare(tiny_rope_model(request.param))


def _ids(n=N, seed=1):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_the_rope_type_is_the_one_configured(model):
    rotary = model.model.rotary_emb
    assert rotary.rope_type == model.config.rope_parameters["rope_type"]
    if rotary.rope_type == "yarn":
        assert rotary.attention_scaling == pytest.approx(1.3)  # the factor on cos and sin is in play


def test_below_capacity_sink_equals_the_models_own_forward(model):
    ids = _ids(S + W)
    with torch.no_grad():
        own = model(input_ids=torch.tensor([ids])).logits[0].float()
    got, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), S + W)
    assert (got - own).abs().max() < 1e-4


@pytest.fixture(scope="module")
def reference(model):
    ids = _ids()
    return ids, oracle_logits(model, ids, S, W)


def test_sink_matches_oracle_far_past_the_original_context(model, reference):
    ids, ref = reference
    limit = position_limit(model.config)
    for chunk in (1, 7, N):
        got, cache = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), chunk)
        assert (got - ref).abs().max() < 1e-4, chunk
        if limit is not None:  # rebasing came early enough, and the rotary never changed its frequencies
            assert cache.offset > 0 and cache.seen - cache.offset < limit
            rotary = model.model.rotary_emb
            assert torch.equal(rotary.inv_freq, rotary.original_inv_freq)


def test_fast_decode_matches_oracle(model, reference):
    ids, ref = reference
    stream = Stream(model, StreamConfig(num_sinks=S, window=W, decode="fast"))
    assert stream.decoder is not None
    got = torch.cat([stream.feed([t])[None] for t in ids])
    assert (got - ref).abs().max() < 1e-4


def test_memory_matches_oracle(model):
    assert_memory_matches_oracle(model, _ids(50, seed=3), S, W)


def _length_dependent():
    return [name for name, p in ROPE_VARIANTS.items() if p["rope_type"] in ("dynamic", "longrope")]


@pytest.mark.parametrize("rope", _length_dependent())
def test_a_cache_that_does_not_fit_the_original_context_is_refused(rope):
    model = streamllm.prepare(tiny_rope_model(rope))
    limit = position_limit(model.config)
    with pytest.raises(UnsupportedModelError, match=f"past position {limit - 1}.*cache of {limit} tokens"):
        Stream(model, StreamConfig(num_sinks=4, window=limit - 4))
    Stream(model, StreamConfig(num_sinks=4, window=limit - 5))  # one position to spare is enough


@pytest.mark.parametrize("rope", _length_dependent())
def test_text_positions_past_the_original_context_are_refused(rope):
    """``SinkCache`` (model.generate) and ``dense`` hand the model text positions; they stop with the reason
    instead of going on with frequencies the cache was not made for."""
    model = streamllm.prepare(tiny_rope_model(rope))
    limit = position_limit(model.config)
    for config, rebase in (
        (StreamConfig(num_sinks=S, window=W), False),
        (StreamConfig(method="dense"), True),
    ):
        cache = cache_for(model, config, rebase=rebase)
        forward(model, cache, torch.tensor([_ids(limit)]))  # up to the last position is fine
        with pytest.raises(ValueError, match=f"position {limit} is past {limit - 1}"):
            forward(model, cache, torch.tensor([[5]]))


def test_long_chunks_are_split_below_the_limit():
    model = streamllm.prepare(tiny_rope_model("longrope"))
    config = StreamConfig(num_sinks=S, window=W, chunk_size=100)
    stream = Stream(model, config)
    stream.feed(_ids(120))
    assert stream.cache.seen == 120 and stream.cache.seen - stream.cache.offset < 48


def test_an_unchecked_rope_type_is_refused_with_the_reason():
    model = tiny_model("llama")
    model.config.rope_parameters = dict(model.config.rope_parameters, rope_type="mrope")
    with pytest.raises(UnsupportedModelError, match="rope type 'mrope' has not been checked"):
        streamllm.prepare(model)


def test_every_rope_type_transformers_ships_is_checked_here():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from streamllm.backends.arch import FIXED_ROPE, LENGTH_DEPENDENT_ROPE

    shipped = set(ROPE_INIT_FUNCTIONS) | {"default"}
    assert shipped <= set(FIXED_ROPE + LENGTH_DEPENDENT_ROPE)  # a new one is refused until it is added
    tested = {p["rope_type"] for p in ROPE_VARIANTS.values()} | {"default"}
    assert set(FIXED_ROPE + LENGTH_DEPENDENT_ROPE) == tested


def test_gemma3_per_layer_rope_with_linear_scaling():
    """Gemma3's global layers use linear scaling in its released configs; its local ones the default."""
    config = tf.Gemma3TextConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=12,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    )
    torch.manual_seed(0)
    model = streamllm.prepare(tf.AutoModelForCausalLM.from_config(config).eval())
    ids = _ids(60, seed=4)
    ref = oracle_logits(model, ids, S, W)
    got, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), 5)
    assert (got - ref).abs().max() < 1e-4
