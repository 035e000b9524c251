"""The engine against the reference oracle, on tiny random models of every supported architecture."""

import pytest
import torch
import transformers as tf
from helpers import engine_logits, greedy_generate
from oracle import oracle_logits
from tiny import ARCHS, tiny_model

import streamllm
from streamllm import SinkCache, StreamConfig, UnsupportedModelError
from streamllm.backends.hf import cache_for, forward
from streamllm.core.cache import NotPreparedError
from streamllm.runtime.stream import Stream

S, W = 2, 14  # cache of 16; streams of 3x+ that
N = 56


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    m = tiny_model(request.param)
    streamllm.prepare(m)
    return m


def _ids(n=N, seed=1):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("chunk", [1, 5, N])
def test_sink_matches_oracle(model, chunk):
    ids = _ids()
    ref = oracle_logits(model, ids, S, W)
    got, cache = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), chunk)
    assert (got - ref).abs().max() < 1e-4
    assert cache.cache_length() == S + W


def test_chunked_equals_token_by_token(model):
    ids = _ids(seed=2)
    one, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), 1)
    many, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), 23)
    assert (one - many).abs().max() < 1e-4


def test_rebasing_keeps_results_exact(model):
    ids = _ids(seed=3)
    plain, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), 3)
    rebased, cache = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W, rebase_every=5), 3)
    assert cache.offset > 0  # rebasing happened
    assert cache.seen - cache.offset < S + W + 5 + 3  # the next model position
    assert (plain - rebased).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["window", "dense"])
def test_baselines_match_oracle(model, method):
    ids = _ids(seed=4)
    config = StreamConfig(num_sinks=S, window=W, method=method)
    ref = oracle_logits(model, ids, 0, None if method == "dense" else S + W)
    got, _ = engine_logits(model, ids, config, 7)
    assert (got - ref).abs().max() < 1e-4


def test_below_capacity_sink_equals_dense(model):
    ids = _ids(n=S + W)
    sink, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), 4)
    with torch.no_grad():
        dense = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    assert (sink - dense).abs().max() < 1e-4


def test_sinks_change_results_once_eviction_starts(model):
    ids = _ids(seed=5)
    sink, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), 8)
    window, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W, method="window"), 8)
    assert (sink[: S + W] - window[: S + W]).abs().max() < 1e-4
    assert (sink[S + W + 1 :] - window[S + W + 1 :]).abs().max() > 1e-3


def test_recompute_equals_dense_on_each_window(model):
    ids = _ids(n=30, seed=6)
    C = 8
    stream = Stream(model, StreamConfig(num_sinks=2, window=6, method="recompute", chunk_size=7))
    got = torch.cat(list(stream.chunks(ids)))
    with torch.no_grad():
        for t in (0, 5, 8, 9, 29):
            window = ids[max(0, t - C) : t + 1]
            ref = model(input_ids=torch.tensor([window]), use_cache=False).logits[0, -1]
            assert (got[t] - ref).abs().max() < 1e-4
    assert stream.cache_length == C


def test_generate_drop_in_matches_oracle(model):
    prompt = _ids(n=6, seed=7)
    new = 3 * (S + W)
    cache = SinkCache(model, num_sinks=S, window=W)
    seq, gen_logits = greedy_generate(model, prompt, cache, new)
    assert len(seq) == len(prompt) + new
    ref = oracle_logits(model, seq[:-1], S, W)
    assert (gen_logits - ref[len(prompt) - 1 :]).abs().max() < 1e-4
    assert all(layer.keys.shape[2] <= S + W for layer in cache.kv.layers)


def test_unprepared_model_is_refused():
    m = tiny_model("llama")
    with pytest.raises(NotPreparedError):
        m(input_ids=torch.tensor([[1, 2, 3]]), cache=SinkCache(m, 2, 4), use_cache=True)


def test_a_cache_made_for_another_model_is_refused():
    llama, neox = streamllm.prepare(tiny_model("llama")), streamllm.prepare(tiny_model("gpt_neox"))
    gemma = streamllm.prepare(tiny_model("gemma3_text"))
    config = StreamConfig(num_sinks=S, window=W)
    cache = cache_for(llama, config)
    forward(llama, cache, torch.tensor([[1, 2, 3]]))
    with pytest.raises(NotPreparedError, match="another model"):  # 4 kv heads against 2
        forward(neox, cache, torch.tensor([[4]]))
    with pytest.raises(NotPreparedError, match="2 layers"):  # 4 layers against 2
        forward(gemma, cache_for(llama, config), torch.tensor([[4]]))


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50), "learned absolute positions"),
        (
            tf.OPTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=50),
            "recompute",
        ),
        (
            tf.GPTJConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=50, rotary_dim=8),
            "'gptj' is not supported",
        ),
    ],
)
def test_unsupported_architectures_name_the_reason(config, reason):
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match=reason):
        streamllm.prepare(model)


@pytest.mark.parametrize("chunk", [1, 5, N])
def test_text_positions_match_oracle(model, chunk):
    ids = _ids(seed=4)
    ref = oracle_logits(model, ids, S, W, text_positions=True)
    config = StreamConfig(num_sinks=S, window=W, positions="text", rebase_every=8)  # rebases on the way
    got, _ = engine_logits(model, ids, config, chunk)
    assert (got - ref).abs().max() < 1e-4


def test_position_modes_agree_until_eviction_then_differ(model):
    ids = _ids(seed=5)
    cache_pos, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W), 7)
    text_pos, _ = engine_logits(model, ids, StreamConfig(num_sinks=S, window=W, positions="text"), 7)
    first = S + W + 1  # tokens 0..S+W see the same positions either way
    assert (
        cache_pos[:first] - text_pos[:first]
    ).abs().max() < 1e-5  # (chunks mixing both are split differently)
    assert (cache_pos[first + 1 :] - text_pos[first + 1 :]).abs().max() > 1e-4
    short = ids[: S + W]  # a stream shorter than the cache: the very same computation
    a, _ = engine_logits(model, short, StreamConfig(num_sinks=S, window=W), 5)
    b, _ = engine_logits(model, short, StreamConfig(num_sinks=S, window=W, positions="text"), 5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["sink", "window", "dense", "recompute"])
def test_fast_perplexity_equals_token_by_token(model, method):
    from streamllm.runtime.perplexity import streaming_nll

    ids = _ids(seed=6)
    config = StreamConfig(num_sinks=S, window=W, method=method, chunk_size=1)
    slow = streaming_nll(model, ids, config).nll
    for chunk in (9, N):
        fast = streaming_nll(
            model, ids, StreamConfig(num_sinks=S, window=W, method=method, chunk_size=chunk)
        ).nll
        assert fast.shape == slow.shape == (N - 1,)
        assert (fast - slow).abs().max() < 1e-4


def test_sampled_recompute_equals_streamed_recompute(model):
    from streamllm.runtime.perplexity import recompute_nll, streaming_nll

    ids = _ids(seed=7)
    full = streaming_nll(model, ids, StreamConfig(num_sinks=S, window=W, method="recompute")).nll
    picked = [1, 5, S + W, S + W + 1, S + W + 2, 40, N - 1]
    sampled = recompute_nll(model, ids, S + W, picked)
    assert (sampled - full[torch.tensor(picked) - 1]).abs().max() < 1e-4


def test_recompute_windows_start_with_the_streams_bos(model, monkeypatch):
    """A stream that starts with the model's BOS has every rebuilt window start with it, in place of the
    window's oldest token, streamed and sampled alike; another stream's windows are plain."""
    from torch.nn import functional as F

    from streamllm.runtime.perplexity import recompute_nll, streaming_nll

    monkeypatch.setattr(model.config, "bos_token_id", 3)
    C, j = S + W, N - 1  # token j, predicted from the C + 1 tokens before it

    def nll(window):
        logits = model(input_ids=torch.tensor([window]), use_cache=False).logits[0, -1:]
        return float(F.cross_entropy(logits, torch.tensor([ids[j]])))

    ids = [3, *_ids(seed=8)[1:]]
    streamed = streaming_nll(model, ids, StreamConfig(num_sinks=S, window=W, method="recompute")).nll
    want = nll([3, *ids[j - C : j]])  # BOS in place of the oldest
    assert abs(float(streamed[j - 1]) - want) < 1e-4
    assert abs(float(recompute_nll(model, ids, C, [j])[0]) - want) < 1e-4
    ids = [4, *ids[1:]]  # no BOS
    assert abs(float(recompute_nll(model, ids, C, [j])[0]) - nll(ids[j - 1 - C : j])) < 1e-4
