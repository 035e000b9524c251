"""Families whose attention is written in their own modules (BLOOM, MPT, Falcon; ALiBi or rotary), on tiny random
models: each streams exactly. Below capacity the engine equals the model's own forward; past it, the paper's
algorithm run by the model's own attention code over a trimmed cache (``oracle.cache_oracle_logits``)."""

import inspect

import pytest
import torch
import transformers as tf
from helpers import engine_logits, greedy_generate
from oracle import cache_oracle_logits
from transformers.cache_utils import DynamicCache

import streamllm
from streamllm import SinkCache, StreamConfig
from streamllm.backends.arch import UnsupportedModelError, alibi_slopes, shape_of
from streamllm.backends.hf import cache_for, forward
from streamllm.backends.inline import uninstall
from streamllm.config import MemoryConfig
from streamllm.core.rotary import rotate

S, W = 2, 14
_SMALL = dict(vocab_size=101, hidden_size=96)


def _configs():
    # 6 heads: slopes past the power of two below (BLOOM) or above (MPT); 4 heads where Falcon's bfloat16
    # rounding of slope times position is exact, as it is for every power-of-two slope below 256 positions
    return {
        "bloom": tf.BloomConfig(**_SMALL, n_layer=2, n_head=6),
        "mpt": tf.MptConfig(
            vocab_size=101, d_model=96, n_heads=6, n_layers=2, max_seq_len=128, attn_config={"clip_qkv": 4.0}
        ),
        "falcon-alibi": tf.FalconConfig(**_SMALL, num_hidden_layers=2, num_attention_heads=4, alibi=True),
        "falcon": tf.FalconConfig(**_SMALL, num_hidden_layers=2, num_attention_heads=4),
        "falcon-mq": tf.FalconConfig(**_SMALL, num_hidden_layers=2, num_attention_heads=4, multi_query=True),
        "falcon-gqa": tf.FalconConfig(
            **_SMALL,
            num_hidden_layers=2,
            num_attention_heads=6,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
    }


NAMES = list(_configs())


def _model(name: str):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_configs()[name], dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights, so that a misplaced bias or rotation shows in the logits
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(4.0)
    return model


def _ids(n, seed=1):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    return request.param, _model(request.param)


def test_streams_exactly(family):
    name, model = family
    ids = _ids(44)
    with torch.no_grad():
        own = model(input_ids=torch.tensor([ids[: S + W]])).logits[0].float()
    ref = cache_oracle_logits(model, ids, S, W)  # before prepare: the model's own code throughout
    assert (ref[: S + W] - own).abs().max() < 1e-4
    streamllm.prepare(model)
    try:
        with torch.no_grad():  # a plain forward of a prepared model is the model's own
            plain = model(input_ids=torch.tensor([ids[: S + W]])).logits[0].float()
        assert (plain - own).abs().max() < 1e-4
        assert (
            cache_oracle_logits(model, ids, S, W) - ref
        ).abs().max() < 1e-4  # so is one with its own cache
        for chunk in (1, 5, 44):
            got, cache = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), chunk)
            assert (got - ref).abs().max() < 1e-4, chunk
            assert cache.cache_length() == S + W
        window, _ = engine_logits(model, ids, StreamConfig(num_sinks=0, window=S + W), 5)
        assert (window[S + W + 1 :] - ref[S + W + 1 :]).abs().max() > 1e-2  # the sinks' bias shows
    finally:
        uninstall([m for m in model.modules() if hasattr(m, "streamllm_original_forward")])


def test_falcon_rotary_moves_keys_as_the_model_does():
    """What the oracle cannot check (it uses the same rotation): ``rotate`` turns a key as Falcon's rotary does."""
    model = _model("falcon")
    keys = {}
    for pos in (3, 40):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(
                input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[pos]]), cache=cache, use_cache=True
            )
        keys[pos] = [layer.keys for layer in cache.layers]
    assert alibi_slopes(model.config) is None
    for i, inv_freq in enumerate(shape_of(model).inv_freqs):
        assert inv_freq.abs().min() > 0
        assert (rotate(keys[3][i], torch.tensor([37]), inv_freq) - keys[40][i]).abs().max() < 1e-5


def test_batched_rows_and_generate_drop_in():
    model = streamllm.prepare(_model("bloom"))
    ids = [_ids(30, seed=2), _ids(30, seed=3)]
    config = StreamConfig(num_sinks=S, window=W)
    alone = [engine_logits(model, row, config, 1)[0] for row in ids]
    caches = [cache_for(model, config), cache_for(model, config)]
    rows = [forward(model, caches, torch.tensor([[ids[0][t]], [ids[1][t]]])) for t in range(30)]
    together = torch.cat(rows, dim=1)  # (2, 30, V)
    for r in range(2):
        assert (together[r] - alone[r]).abs().max() < 1e-4

    prompt, new = ids[0][:6], 2 * (S + W)
    seq, logits = greedy_generate(model, prompt, SinkCache(model, num_sinks=S, window=W), new)
    ref, _ = engine_logits(model, seq[:-1], config, 1)
    assert (logits - ref[len(prompt) - 1 :]).abs().max() < 1e-4


def test_memory_is_refused_for_alibi_with_the_reason():
    model = streamllm.prepare(_model("mpt"))
    config = StreamConfig(num_sinks=S, window=W, memory=MemoryConfig(block_size=4, blocks=2))
    with pytest.raises(UnsupportedModelError, match="ALiBi model has none"):
        cache_for(model, config)


@pytest.mark.parametrize("name", ["bloom", "mpt", "falcon"])
def test_a_forward_that_changed_upstream_is_refused_by_name(name):
    """Where a release drops a parameter the family's forward reads, ``prepare`` names the family, the parameter
    and the transformers version, and leaves every module as it was."""
    model = _model(name)
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "forward")]
    modules = [m for m in modules if "Attention" in type(m).__name__]

    def renamed(hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        raise AssertionError("not called")

    modules[-1].forward = renamed
    with pytest.raises(UnsupportedModelError) as err:
        streamllm.prepare(model)
    message = str(err.value)
    assert {"BLOOM": "bloom", "MPT": "mpt", "Falcon": "falcon"}[
        message.split(" models")[0].split()[-1]
    ] == name
    assert f"transformers {tf.__version__}" in message and "no longer takes" in message
    assert not any(hasattr(m, "streamllm_original_forward") for m in model.modules())


def test_arguments_are_read_by_name_not_position():
    """The same call with its arguments as keywords in another order streams the same logits."""
    model = _model("falcon")
    ids = _ids(30)
    streamllm.prepare(model)
    try:
        want, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), 5)
        attn = next(m for m in model.modules() if type(m).__name__ == "FalconAttention")
        inner = attn.forward

        def shuffled(*args, **kwargs):
            bound = inspect.signature(attn.streamllm_original_forward).bind(*args, **kwargs)
            named = {**bound.arguments, **bound.arguments.pop("kwargs", {})}
            return inner(**dict(reversed(list(named.items()))))

        attn.forward = shuffled
        got, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), 5)
        assert (got - want).abs().max() < 1e-6
    finally:
        uninstall([m for m in model.modules() if hasattr(m, "streamllm_original_forward")])
