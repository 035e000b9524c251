"""GGUF files as people have them (F32, Q8_0, Q6_K, Q5_K_M, Q4_K_M), written from a tiny Llama with the real
tokenizer's vocabulary: they load, dequantized to the dtype asked for; they stream exactly; ``--decode int4``
keeps every matrix that came from 4-bit blocks in 4 bits; and files that cannot load are named with the reason."""

import shutil

import gguf
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run
from gguf_files import MIXES, write_llama
from helpers import engine_logits
from oracle import oracle_logits
from transformers import LlamaConfig, LlamaForCausalLM

from streamllm import Stream, StreamConfig
from streamllm.backends.decode import decoder_for
from streamllm.backends.quant import Int4MatVec, Int8MatVec
from streamllm.gguf_file import summary
from streamllm.models import ModelError, load_model, pull

# How far each file type's logits may be from the float model's (max difference over the largest logit).
BOUND = {"F32": 1e-5, "Q8_0": 0.03, "Q6_K": 0.08, "Q5_K_M": 0.1, "Q4_K_M": 0.2}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The float model and its GGUF files, {file type: (path, {tensor: type})}."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,  # K-quant blocks are 256 wide
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("gguf")
    tokenizer = pull("smollm2-135m")
    files = {mix: (folder / f"tiny-{mix}.gguf") for mix in MIXES}
    return model, {mix: (path, write_llama(model, tokenizer, path, mix)) for mix, path in files.items()}


IDS = torch.randint(0, 1024, (1, 48), generator=torch.Generator().manual_seed(1))


def test_gguf_file_is_parsed_once(written, monkeypatch):
    """streamllm checks a GGUF file and transformers reads it for the config, the weights and the tokenizer; the
    file is parsed once for all four (a 262K-token vocabulary takes about 20 s to parse), and loads the same."""
    made = []

    class Counted(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    path, _ = written[1]["F32"]
    model, tokenizer = load_model(str(path))
    assert len(made) == 1
    assert gguf.GGUFReader is Counted  # put back as it was
    assert tokenizer("to be or not").input_ids
    with torch.no_grad():
        ref, got = written[0](IDS).logits, model(IDS).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < BOUND["F32"]


@pytest.mark.parametrize("mix", list(MIXES))
def test_gguf_file_loads_dequantized(written, mix):
    """Every tensor comes back as the gguf package dequantizes it, and the logits stay within the file type's
    rounding of the float model's (F32: exactly)."""
    original, files = written
    path, types = files[mix]
    counts = summary(path)
    assert sum(counts.values()) == len(types)
    assert counts == {t.name: list(types.values()).count(t) for t in set(types.values())}
    model, tokenizer = load_model(str(path))
    assert tokenizer("to be or not").input_ids  # the vocabulary came with the file
    reader = gguf.GGUFReader(path)
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    want = gguf.quants.dequantize(down.data, down.tensor_type)  # (E, F)
    assert np.array_equal(model.model.layers[1].mlp.down_proj.weight.detach().numpy(), want)
    with torch.no_grad():
        ref, got = original(IDS).logits, model(IDS).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < BOUND[mix]


def test_gguf_file_loads_in_bfloat16(written):
    _, files = written
    model, _ = load_model(str(files["Q4_K_M"][0]), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_k_quant_model_streams_exactly(written):
    """Past a cache of 4 + 16, the model read from a Q4_K_M file streams as the oracle computes it."""
    _, files = written
    model, _ = load_model(str(files["Q4_K_M"][0]))
    ids = IDS[0].tolist()
    ref = oracle_logits(model, ids, 4, 16)
    got, _ = engine_logits(model, ids, StreamConfig(num_sinks=4, window=16), chunk=5)
    assert (got - ref).abs().max() < 1e-4


def test_int4_decode_keeps_q4_k_matrices_in_4_bits(written):
    """Q4_K blocks do not always use the ends of their grid; every matrix made of them alone still comes back
    in 4 bits, nearly exactly, and the 6-bit ones go to 8 bits. Fused matrices follow their parts: layer 0's
    q, k, v holds a 6-bit v. (Nearly: a Q4_K step is a float16 times a 6-bit integer, up to 17 significant bits,
    which the native tiles' float16 steps round to 11; torch's layout rounds them to bfloat16's 8.)"""
    _, files = written
    model, _ = load_model(str(files["Q4_K_M"][0]))
    decoder = decoder_for(model, "int4")
    first, second = decoder.layers
    for mat in (first.o, first.gate_up, second.qkv, second.o, second.gate_up, second.down):
        assert isinstance(mat, Int4MatVec) and mat.error < 2e-3
    for mat in (first.qkv, first.down, decoder.lm_head):
        assert isinstance(mat, Int8MatVec)
    with torch.no_grad():
        exact = model(IDS).logits[0]
    stream = Stream(model, StreamConfig(num_sinks=4, window=60, decode="int4"))
    rows = torch.stack([stream.feed([t]) for t in IDS[0].tolist()])  # (48, V), one token at a time
    assert float((rows - exact).abs().max() / exact.abs().max()) < 0.02


def test_bad_gguf_files_are_named(written, tmp_path):
    """A file cut short, a tensor of a quantization type nobody knows, a file that is not GGUF, and an
    architecture transformers does not read: each one line, naming the reason."""
    _, files = written
    source = files["Q4_K_M"][0]
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(source.read_bytes()[:2000])
    unknown = tmp_path / "unknown.gguf"
    shutil.copy(source, unknown)
    reader = gguf.GGUFReader(unknown, "r+")
    reader.tensors[3].field.parts[4][0] = 999  # the tensor's type
    reader.data.flush()
    del reader
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "no-such-arch")
    writer.add_tensor("x", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path, needle in (
        (truncated, "is truncated"),
        (header_only, "is truncated"),
        (unknown, "unknown quantization type 999"),
        (not_gguf, "not a GGUF file"),
        (other, "architecture no-such-arch is not supported"),
    ):
        with pytest.raises(ModelError, match=needle):
            load_model(str(path))
    assert_one_line_error(run("generate", "--prompt", "hi", "--model", str(truncated)), "is truncated")


@pytest.mark.parametrize("mix", list(MIXES))
def test_default_decode_follows_the_files_four_bit_share(written, mix):
    """``--decode auto`` on a GGUF file: int4 where most of its matrix weights are in a 4-bit type."""
    from streamllm.defaults import FOUR_BIT, INT4_SHARE, choose, four_bit_share

    path, types = written[1][mix]
    sizes = {t.name: int(np.prod(t.shape)) for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
    four = sum(n for name, n in sizes.items() if types[name].name in FOUR_BIT)
    share = four_bit_share(path)
    assert share == pytest.approx(four / sum(sizes.values()))
    assert (share > 0) == (mix == "Q4_K_M")
    assert choose(str(path), flags=set()).decode == ("int4" if share >= INT4_SHARE else "fast")
