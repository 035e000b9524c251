"""The 8-bit key/value cache (``core/store.py``): its rounding, every decode path against the others, chunks
against single tokens, its size, saving and restoring, and its cost on real text."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from cli_helpers import assert_one_line_error, run_here
from test_decode import NATIVE, _decode_rows, _ids
from tiny import tiny_model

from streamllm import StreamConfig
from streamllm.backends import native
from streamllm.config import ConfigError, MemoryConfig
from streamllm.core.store import dequantize, quantize
from streamllm.runtime.perplexity import streaming_nll
from streamllm.runtime.stream import Stream

SINK = StreamConfig(num_sinks=2, window=9, rebase_every=7, kv_dtype="int8")


def _native_or_skip():
    if shutil.which("c++") is None or native.kernels() is None:
        pytest.skip("no C++ compiler here: decoding uses the Python step")


def test_quantized_rows_are_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 64, generator=g) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]
    x[1, 2, 5] = 400.0  # an outlier sets its row's scale
    x[2, 1] = 0.0  # an empty row
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 4)
    back = dequantize(q, scale, torch.float32)
    assert ((back - x).abs() <= scale[..., None] / 2 * (1 + 1e-5)).all()
    top = x.abs().argmax(-1, keepdim=True)
    assert torch.allclose(back.gather(-1, top), x.gather(-1, top), rtol=1e-6)  # each row's largest is exact
    assert scale[2, 1] == 0 and (back[2, 1] == 0).all()


def test_bad_kv_dtype_is_refused():
    with pytest.raises(ConfigError, match="unknown kv dtype"):
        StreamConfig(kv_dtype="int4")
    with pytest.raises(ConfigError, match="recompute"):
        StreamConfig(method="recompute", kv_dtype="int8")


@pytest.mark.parametrize("arch", NATIVE)
@pytest.mark.parametrize("config", [SINK, dataclasses.replace(SINK, method="dense")], ids=["sink", "dense"])
def test_every_decode_path_reads_the_same_8bit_cache(arch, config, monkeypatch):
    """The C++ step (int8 products, sinks scored in place), the Python step and transformers' forward all see
    the keys and values as stored, the token's own too; the cache is really 8-bit and changes the logits a
    little."""
    _native_or_skip()
    model = tiny_model(arch)
    ids = _ids(seed=7)
    full, _ = _decode_rows(model, ids, dataclasses.replace(config, kv_dtype="model"), decode="fast")
    fast, stream = _decode_rows(model, ids, config, decode="fast")
    assert stream.decoder.native is not None and stream.cache.layers[0].keys.dtype == torch.int8
    slow, _ = _decode_rows(model, ids, config, decode="transformers")
    monkeypatch.setattr(stream.decoder, "native", None)
    python, _ = _decode_rows(model, ids, config, decode="fast")
    assert (fast - python).abs().max() < 1e-5
    assert (python - slow).abs().max() < 1e-5
    change = float((fast - full).abs().max() / full.abs().max())
    assert 1e-5 < change < 1e-2


def test_a_chunk_is_what_single_tokens_give():
    """Within a chunk the new tokens see each other as stored, so chunked prefill gives the single tokens'
    logits: up to a key whose float rounding lands it on the other side of an 8-bit step, far below what the
    8 bits change."""
    model = tiny_model("llama")
    ids = _ids(seed=2)
    config = dataclasses.replace(SINK, decode="transformers")
    one = torch.cat(list(Stream(model, dataclasses.replace(config, chunk_size=1)).chunks(ids)))
    chunked = torch.cat(list(Stream(model, dataclasses.replace(config, chunk_size=40)).chunks(ids)))
    full = torch.cat(list(Stream(model, dataclasses.replace(config, kv_dtype="model")).chunks(ids)))
    assert (one - chunked).abs().max() < 0.02 * (one - full).abs().max()


def test_bytes_per_session():
    """D int8 numbers and one float32 scale per key instead of D float32 numbers."""
    model = tiny_model("llama")
    sizes = {}
    for kv in ("model", "int8"):
        stream = Stream(model, dataclasses.replace(SINK, kv_dtype=kv))
        stream.feed(_ids(30))
        sizes[kv] = stream.cache_bytes()
    D = model.config.hidden_size // model.config.num_attention_heads
    assert sizes["int8"] * 4 * D == sizes["model"] * (D + 4)


def test_saved_state_continues_exactly_and_converts():
    """An 8-bit state restored into a fresh 8-bit cache continues bit for bit; restored into a full-precision
    cache (or the other way round) it continues close to the original."""
    model = tiny_model("qwen2")
    ids = _ids(50, seed=4)
    source = Stream(model, SINK)
    source.feed(ids[:30])
    state = copy.deepcopy(source.cache.state_dict())  # its tensors are the live ones
    assert state["layers"][0]["keys"].dtype == torch.int8 and "key_scales" in state["layers"][0]
    want = torch.stack([source.feed([t]) for t in ids[30:]])
    for kv, tol in (("int8", 0.0), ("model", 1e-2)):
        other = Stream(model, dataclasses.replace(SINK, kv_dtype=kv))
        other.cache.load_state_dict(state)
        got = torch.stack([other.feed([t]) for t in ids[30:]])
        assert (got - want).abs().max() <= tol * want.abs().max(), kv
    full = Stream(model, dataclasses.replace(SINK, kv_dtype="model"))
    full.feed(ids[:30])
    into8 = Stream(model, SINK)
    into8.cache.load_state_dict(full.cache.state_dict())
    assert into8.cache.layers[0].keys.dtype == torch.int8
    got = torch.stack([into8.feed([t]) for t in ids[30:]])
    assert (got - want).abs().max() < 1e-2 * want.abs().max()


def test_memory_recalls_through_the_8bit_cache(monkeypatch):
    """Recalled blocks go into the 8-bit scratch slots; the C++ and Python steps read them alike."""
    _native_or_skip()
    model = tiny_model("qwen2")
    memory = MemoryConfig(block_size=4, blocks=2, reps=2, refresh=5, ram_mb=1)
    config = StreamConfig(num_sinks=2, window=6, rebase_every=7, memory=memory, kv_dtype="int8")
    ids = _ids(60, seed=4)
    native_rows, stream = _decode_rows(model, ids, config, decode="fast", prefill=9)
    assert stream.cache.memory.recalled_len > 0
    monkeypatch.setattr(stream.decoder, "native", None)
    python_rows, _ = _decode_rows(model, ids, config, decode="fast", prefill=9)
    assert (native_rows - python_rows).abs().max() < 1e-4


@pytest.mark.real
def test_8bit_cache_on_real_text(real):
    """SmolLM2 on Hamlet, 3x past a small cache with rebasing: the 8-bit cache costs well under 1% perplexity."""
    from streamllm.data import shakespeare_text

    model, tokenizer = real
    ids = tokenizer.encode(shakespeare_text("hamlet"), add_special_tokens=False)[:400]
    config = StreamConfig(num_sinks=4, window=124, rebase_every=100, chunk_size=64)
    ppl = {}
    for kv in ("model", "int8"):
        nll = streaming_nll(model, ids, dataclasses.replace(config, kv_dtype=kv)).nll
        ppl[kv] = float(nll.mean().exp())
    assert abs(ppl["int8"] / ppl["model"] - 1) < 0.01, ppl
    assert ppl["int8"] != ppl["model"]


def test_the_commands_take_kv_dtype(capsys, tmp_path):
    """``--kv-dtype int8`` reaches the stream, and the ``--json`` summary names it."""
    text = tmp_path / "t.txt"
    text.write_text("The sea was calm and the ship sailed on through the night. " * 6)
    ppl = {}
    for kv in ("model", "int8"):
        args = ("perplexity", "--text", str(text), "--window", "28", "--json", "--exact", "--kv-dtype", kv)
        result = run_here(capsys, *args)
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["path"]["kv_dtype"] == kv
        ppl[kv] = summary["ppl"]
    assert ppl["int8"] != ppl["model"] and abs(ppl["int8"] / ppl["model"] - 1) < 0.02
    bad = run_here(capsys, "generate", "--prompt", "hi", "--kv-dtype", "int4")
    assert_one_line_error(bad, "--kv-dtype")
