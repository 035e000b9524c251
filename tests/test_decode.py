"""The fast decode path (``decode.Decoder``) against transformers' forward on the same cache, and against the oracle."""

import dataclasses
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from oracle import oracle_logits
from tiny import tiny_model

import streamllm
from streamllm import StreamConfig
from streamllm.backends import native
from streamllm.backends.angles import RotaryRows, RotaryTurns
from streamllm.backends.arch import ARCHITECTURES
from streamllm.backends.decode import decoder_for
from streamllm.backends.quant import INT4_MAX_ERROR, Int4MatVec, Int8MatVec, kept_quantized, quantized
from streamllm.runtime.stream import Stream

FAST = [name for name, arch in ARCHITECTURES.items() if arch.fast_decode]
NATIVE = [name for name in FAST if name != "gemma3_text"]  # Gemma3 takes the Python step
S, W = 2, 9
EVERY_POLICY = pytest.mark.parametrize(
    "config",
    [
        StreamConfig(num_sinks=S, window=W, rebase_every=7),
        StreamConfig(num_sinks=S, window=W, positions="text", rebase_every=7),
        StreamConfig(num_sinks=0, window=W, method="window"),
        StreamConfig(method="dense"),
    ],
    ids=["sink", "sink-text-positions", "window", "dense"],
)


def _ids(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, (n,), generator=g).tolist()


def _decode_rows(model, ids, config, decode, prefill=3):
    """Logits (N, V): ``prefill`` tokens as one chunk, then one token at a time."""
    stream = Stream(model, dataclasses.replace(config, decode=decode))
    rows = list(stream.chunks(ids[:prefill]))
    rows += [stream.feed([t])[None] for t in ids[prefill:]]
    return torch.cat(rows), stream


@pytest.mark.parametrize("arch", FAST)
@EVERY_POLICY
def test_fast_decode_matches_transformers_forward(arch, config):
    model = tiny_model(arch)
    ids = _ids()
    slow, _ = _decode_rows(model, ids, config, decode="transformers")
    fast, stream = _decode_rows(model, ids, config, decode="fast")
    assert stream.decoder is not None
    assert (fast - slow).abs().max() < 1e-5
    assert stream.cache.cache_length() == (
        len(ids) if config.method == "dense" else S * (config.method == "sink") + W
    )


@pytest.mark.parametrize("arch", FAST)
def test_fast_decode_matches_oracle(arch):
    model = streamllm.prepare(tiny_model(arch))
    ids = _ids(seed=3)
    ref = oracle_logits(model, ids, S, W)
    got, _ = _decode_rows(
        model, ids, StreamConfig(num_sinks=S, window=W, rebase_every=5), decode="fast", prefill=1
    )
    assert (got - ref).abs().max() < 1e-4


def test_fused_weights_are_stored_once():
    model = tiny_model("llama")
    decoder = decoder_for(model)
    assert decoder_for(model) is decoder  # built once per model
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == decoder.layers[0].qkv.weight.data_ptr()
    assert (
        attn.k_proj.weight.untyped_storage().data_ptr()
        == decoder.layers[0].qkv.weight.untyped_storage().data_ptr()
    )


def test_other_architectures_decode_through_transformers():
    model = tiny_model("gpt_neox")
    assert Stream(model, StreamConfig(num_sinks=S, window=W)).decoder is None


def test_gemma3_takes_the_python_step():
    """Gemma's norms, scaled embeddings, GELU and sliding layers are the Python step's, not the native one's;
    the norm weights are drawn far from zero, so that mixing up Gemma's ``1 + weight`` with Llama's shows."""
    stream = Stream(tiny_model("gemma3_text"), StreamConfig(num_sinks=S, window=W))
    assert stream.decoder is not None and stream.decoder.native is None
    assert stream.decoder.norm.gemma and stream.decoder.embed_scale is not None


def test_bfloat16_fast_decode_within_rounding():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = _ids(seed=5)
    config = StreamConfig(num_sinks=S, window=W, rebase_every=7)
    slow, _ = _decode_rows(model, ids, config, decode="transformers")
    fast, _ = _decode_rows(model, ids, config, decode="fast")
    assert (fast - slow).abs().max() < 2e-2


def test_int4_matvec_recovers_q4_1_weights():
    """Weights already on a 4-bit grid per group of 32 (as GGUF's Q4_1 stores them) come back nearly exact."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (48, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole grid
    scale = (torch.rand(48, 4, 1, generator=g) * 0.02 + 0.005).half().float()  # Q4_1's scales are float16
    low = (torch.randn(48, 4, 1, generator=g) * 0.05).half().float()
    weight = (q * scale + low).view(48, 128)  # (N, K)
    x = torch.randn(128, generator=g)
    got = Int4MatVec(weight)(x)
    want = weight @ x
    assert (got - want).abs().max() < 0.02 * want.abs().max()  # x in 8 (or bfloat16) bits
    assert Int4MatVec(weight).error < 1e-5
    assert isinstance(quantized(weight), Int4MatVec)
    rough = torch.randn(48, 128, generator=g)  # not on a 4-bit grid: kept in 8 bits
    assert Int4MatVec(rough).error > INT4_MAX_ERROR
    int8 = quantized(rough)
    assert isinstance(int8, Int8MatVec)
    assert (int8(x) - rough @ x).abs().max() < 0.02 * (rough @ x).abs().max()


def test_quantized_weights_are_kept_on_disk_and_read_back(tmp_path, monkeypatch):
    """The 4- and 8-bit copies come back from $STREAMLLM_HOME/quant exactly as fitted; another dtype of the same
    numbers is another entry; a damaged file is fitted again and replaced."""
    monkeypatch.setenv("STREAMLLM_HOME", str(tmp_path))
    g = torch.Generator().manual_seed(4)
    on_grid = (torch.randint(0, 16, (48, 128), generator=g) * 0.01 - 0.07).float()
    rough = torch.randn(48, 128, generator=g)
    x = torch.randn(128, generator=g)
    first = [kept_quantized(w) for w in (on_grid, rough)]
    kept = sorted((tmp_path / "quant").glob("*.safetensors"))
    assert [type(m) for m in first] == [Int4MatVec, Int8MatVec] and len(kept) == 2
    for _ in range(2):
        again = [kept_quantized(w) for w in (on_grid, rough)]
        for a, b in zip(first, again, strict=True):
            assert type(a) is type(b) and all(
                torch.equal(s, t) for s, t in zip(a.tensors, b.tensors, strict=True)
            )
            assert torch.equal(a(x), b(x))
        assert again[0].error == first[0].error
        for path in kept:
            path.write_bytes(b"not a safetensors file")  # the second round fits again and rewrites them
    kept_quantized(on_grid.bfloat16())
    assert len(list((tmp_path / "quant").glob("*.safetensors"))) == 3


def test_int4_decode_stays_close_to_exact():
    model = tiny_model("llama")
    ids = _ids(seed=6)
    config = StreamConfig(num_sinks=S, window=W)
    exact, _ = _decode_rows(model, ids, config, decode="fast")
    int4, stream = _decode_rows(model, ids, config, decode="int4")
    assert stream.decoder.weights == "int4"
    diff = (int4 - exact).abs()
    assert 0 < float(diff.max()) < 0.1 * float(exact.abs().max())


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rows_are_the_rotary_modules_own(arch, dtype):
    """The angles a token reads from the kept blocks are bit for bit what the model's rotary gives for its
    position alone, at block edges and past the kept positions too."""
    model = tiny_model(arch).to(dtype)
    rows = RotaryRows(model.model.rotary_emb, dtype)
    for pos in (0, 1, 255, 256, 257, 1023, 5000, rows.LIMIT - 1, rows.LIMIT, rows.LIMIT + 77):
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=dtype), torch.tensor([[pos]]))
        got = rows(pos)
        assert got[0].dtype == dtype and torch.equal(got[0], cos[0, 0]) and torch.equal(got[1], sin[0, 0]), (
            pos
        )


def test_turn_values_rotate_as_the_rotary_does():
    """The sinks' turn: its values laid out as the native step's matrix (``RotaryTurns``) rotate as the rotary
    does."""
    from streamllm.core.rotary import rotate

    D, R = 8, 6  # partial rotary: the last two dims stay
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2) / R))
    turns = RotaryTurns(inv_freq)
    x = torch.randn(5, D)
    j = torch.arange(R // 2)
    for shift in (0, -1, -300, -turns.LIMIT, -turns.LIMIT - 1, 7):  # kept blocks and computed ones
        values = turns(shift)
        M = torch.eye(D)
        M[torch.arange(R), torch.arange(R)] = values[:R]
        M[j + R // 2, j] = values[R : R + R // 2]
        M[j, j + R // 2] = values[R + R // 2 :]
        want = rotate(x[None], torch.full((5,), shift), inv_freq)[0]
        assert torch.allclose(x @ M, want, atol=1e-6), shift


def test_dense_cache_grown_while_decoding_takes_chunks_after():
    """A dense cache that outgrows its buffer during a fast step stays usable by the chunked path."""
    model = tiny_model("llama")
    stream = Stream(model, StreamConfig(method="dense"))
    stream.feed(_ids(250))
    for token in _ids(20, seed=1):  # crosses the first 256 slots one token at a time
        stream.feed([token])
    stream.feed(_ids(30, seed=2))  # a chunk: transformers' forward writes into the grown buffers
    assert stream.cache.cache_length() == 300


@pytest.fixture
def kernels():
    """The native decode step, built (once per machine) wherever there is a C++ compiler."""
    if shutil.which("c++") is None or not native.enabled():
        pytest.skip("no C++ compiler here (or STREAMLLM_NATIVE=0): decoding uses the Python step")
    module = native.kernels()
    assert module is not None, "a compiler is present but the native decode kernels did not build"
    return module


@pytest.fixture(params=[2, 4])
def runs(request, kernels):
    """Each thread of a product reads 2 or 4 runs of rows or tiles side by side (the CPU decides which: 2 on AMD,
    4 elsewhere); both are checked wherever the tests run."""
    before = kernels.runs()
    kernels.set_runs(request.param)
    yield request.param
    kernels.set_runs(before)


@pytest.mark.parametrize("arch", NATIVE)
@EVERY_POLICY
def test_native_step_matches_python_step(kernels, arch, config, monkeypatch):
    model = tiny_model(arch)
    ids = _ids(seed=7)
    fast, stream = _decode_rows(model, ids, config, decode="fast")
    assert stream.decoder.native is not None
    monkeypatch.setattr(stream.decoder, "native", None)
    python, _ = _decode_rows(model, ids, config, decode="fast")
    assert (fast - python).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,weights,tol", [(torch.bfloat16, "fast", 2e-2), (torch.float32, "int4", 1e-3)])
def test_native_step_in_other_dtypes_and_weights(kernels, dtype, weights, tol, monkeypatch):
    model = tiny_model("qwen3").to(dtype)  # q and k norms too
    ids = _ids(seed=8)
    config = StreamConfig(num_sinks=S, window=W, rebase_every=7)
    got, stream = _decode_rows(model, ids, config, decode=weights)
    assert stream.decoder.native is not None
    monkeypatch.setattr(stream.decoder, "native", None)
    want, _ = _decode_rows(model, ids, config, decode=weights)
    assert (got - want).abs().max() < tol * want.abs().max()


@pytest.mark.parametrize("decode", ["fast", "int4"])
def test_python_step_when_native_is_switched_off(monkeypatch, decode):
    """Without the native kernels both decode paths run on torch's kernels (for int4, torch's own 4- and 8-bit
    products, which once crashed reading past a matrix's last row) and agree with transformers' forward."""
    monkeypatch.setenv("STREAMLLM_NATIVE", "0")
    monkeypatch.setattr(native, "kernels", native.kernels.__wrapped__)  # skip the cached module
    model = tiny_model("mistral")
    config = StreamConfig(num_sinks=S, window=W)
    got, stream = _decode_rows(model, _ids(30), config, decode=decode)
    assert stream.decoder is not None and stream.decoder.native is None
    assert stream.cache.cache_length() == S + W
    want, _ = _decode_rows(model, _ids(30), config, decode="transformers")
    assert (got - want).abs().max() < (1e-5 if decode == "fast" else 0.1 * want.abs().max())


@pytest.mark.parametrize("kv", ["model", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_streams_in_one_native_step(kernels, dtype, kv):
    """step_many over streams at different points (young, full, rebased) gives each its own single-step logits
    and leaves each cache as single steps would (an 8-bit one within a rounding tie of an 8-bit step)."""
    model = tiny_model("qwen2").to(dtype)  # q/k/v biases too
    config = StreamConfig(num_sinks=S, window=W, rebase_every=7, kv_dtype=kv)
    lengths = [1, 12, 40]
    ids = _ids(80, seed=9)
    alone = [Stream(model, config) for _ in lengths]
    together = [Stream(model, config) for _ in lengths]
    for a, b, n in zip(alone, together, lengths, strict=True):
        a.feed(ids[:n])
        b.feed(ids[:n])
    decoder = together[0].decoder
    for step in range(12):
        tokens = [ids[n + step] for n in lengths]
        want = torch.stack([s.feed([t]) for s, t in zip(alone, tokens, strict=True)])
        got = decoder.step_many([s.cache for s in together], tokens)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # several rows go through torch's matrix product
        assert (got - want).abs().max() <= tol * max(1.0, float(want.abs().max()))
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.cache.layers[0].slot_pos, b.cache.layers[0].slot_pos)
        keys_a, keys_b = a.cache.layers[0].stored()[0], b.cache.layers[0].stored()[0]
        step = a.cache.layers[0].key_scales.max() if kv == "int8" else 0  # one 8-bit step at most
        assert (keys_a.float() - keys_b.float()).abs().max() <= 1e-5 + 1.01 * step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape", [(64, 576), (203, 96), (37, 100), (5, 31)]
)  # whole blocks; ragged rows and columns
def test_native_matrix_products(kernels, runs, dtype, shape):
    """The native step's products with the model's own weights, one row (its AVX-512 kernels for bfloat16 and
    float32) and several (torch's), against float32 arithmetic on the same values."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=g).to(dtype)
    for rows in (1, 3):
        x = torch.randn(rows, shape[1], generator=g).to(dtype)
        want = x.float() @ W.float().t()
        got = kernels.matmul(0, W, torch.empty(0), x)
        assert got.shape == (rows, shape[0]) and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (got.float() - want).abs().max() <= tol * want.abs().max()


def _rows_in_two_bytes(x):
    """The native kernels' copy of rows x (R, K) in torch: per group of 32 inputs (zeros past K), x = s (q + e / 254)
    with q and e (R, G, 32) integers, and s = max|x| / 127 and the group's sum of x, each (R, G)."""
    R, K = x.shape
    padded = torch.zeros(R, -(-K // 32) * 32)
    padded[:, :K] = x.float()
    groups = padded.view(R, -1, 32)
    s = groups.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    q = torch.round(groups * inverse).clamp(-127, 127)
    rest = (groups.double() - s.double() * q.double()).float()  # rounded once, as the kernel's fma
    e = torch.round(rest * inverse * 254).clamp(-127, 127)
    return q, e, s[..., 0], groups.sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_integer_products(kernels, runs, dtype):
    """The 4- and 8-bit tiles' products against the same integer arithmetic in float64 (x in two 8-bit parts per
    group of 32), and against the float weights they hold within that rounding of x (s / 508 per input); one row and
    several, ragged 8-bit shapes, and enough tiles that each thread reads several runs of them side by side with
    some left over."""
    g = torch.Generator().manual_seed(3)
    N, K = 16 * 21, 128
    q4 = torch.randint(0, 16, (N, K // 32, 32), generator=g).float()
    q4[..., 0], q4[..., 1] = 0, 15  # every group spans the whole grid, so the fit finds q, step and low again
    step = (torch.rand(N, K // 32, 1, generator=g) * 0.02 + 0.005).half().float()
    low = (torch.randn(N, K // 32, 1, generator=g) * 0.05).half().float()
    w4 = (q4 * step + low).view(N, K)
    int4 = Int4MatVec(w4)
    assert int4.kernels is not None and int4.packed.shape == (N // 16, K // 32, 256) and int4.error < 1e-5
    for n, k in ((N, K), (37, 100), (5, 31), (300, 70)):
        w8 = torch.randn(n, k, generator=g)
        int8 = Int8MatVec(w8)
        scale8 = w8.abs().amax(-1) / 127
        q8 = torch.round(w8 / scale8[:, None]).clamp(-127, 127)
        held8 = q8 * scale8[:, None]  # the weights the 8-bit copy holds
        for rows in (1, 3):
            x = (torch.randn(rows, k, generator=g) * torch.rand(k, generator=g) * 4).to(
                dtype
            )  # uneven groups
            x[0, :32] = 0  # a group of zeros
            xq, xe, xs, xsum = (t.double() for t in _rows_in_two_bytes(x))
            parts = xq + xe / 254  # (R, G, 32)
            got8 = int8.kernels.matmul(2, int8.q, int8.scale, x)
            assert got8.shape == (rows, n) and got8.dtype == dtype
            dots = (parts[:, None] * _groups(q8.double())[None]).sum(-1)  # (R, N, G)
            _close(got8, (dots * xs[:, None]).sum(-1) * scale8.double(), dtype)
            _close(got8, x.double() @ held8.double().t(), dtype, slack=_x_rounding(held8, xs))
            if k != K:
                continue
            got4 = int4.kernels.matmul(1, int4.packed, int4.scale_zero, x)
            dots = (parts[:, None] * q4.double()[None]).sum(-1)  # (R, N, G)
            want4 = (dots * step[..., 0].double() * xs[:, None] + low[..., 0].double() * xsum[:, None]).sum(
                -1
            )
            _close(got4, want4, dtype)
            _close(got4, x.double() @ w4.double().t(), dtype, slack=_x_rounding(w4, xs))
            assert torch.equal(int4(x[0]), got4[0]) and torch.equal(
                int8(x[0]), got8[0]
            )  # the Python step's call


def _groups(w):
    """(N, K) -> (N, G, 32), zeros past K."""
    N, K = w.shape
    padded = torch.zeros(N, -(-K // 32) * 32, dtype=w.dtype)
    padded[:, :K] = w
    return padded.view(N, -1, 32)


def _x_rounding(w, xs):
    """How far the two-byte copy of x can move x W^T: s / 508 per input times the group's |w|, (R, N)."""
    return (_groups(w.double().abs()).sum(-1)[None] * xs[:, None] / 508).sum(-1)


def _close(got, want, dtype, slack=0.0):
    """got within ``slack`` (R, N) of want, plus float32 summation (or the model dtype's rounding of y)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.double() - want).abs() - slack).max() <= tol * want.abs().max()


OTHER_CPUS = {  # flags after -march=native -> the code paths such a CPU compiles
    "avx512-without-bf16-or-vnni": ("-mno-avx512bf16 -mno-avx512vnni", "portable,avx512f"),  # Skylake-X
    "avx2-only": ("-march=x86-64-v3", "portable"),
}


@pytest.fixture(scope="module")
def other_builds():
    """The native step built as each of ``OTHER_CPUS`` would build it, the builds side by side (each compiler
    uses one core; about a minute): {cpu: (its environment, the paths it compiled, its build log)}."""
    module = native.kernels() if shutil.which("c++") and native.enabled() else None
    if platform.machine() != "x86_64" or module is None or "avx512f" not in module.compiled_for():
        pytest.skip("these variants are built on an x86 CPU with AVX-512 and a C++ compiler")
    probe = "from streamllm.backends import native; print(native.kernels().compiled_for())"
    started = {}
    for cpu, (flags, _) in OTHER_CPUS.items():
        # -O1: these builds test the code paths, not their speed, and -O1 compiles in two thirds of the time
        env = dict(os.environ, STREAMLLM_NATIVE_FLAGS=f"{flags} -O1")
        cmd = [sys.executable, "-c", probe]
        started[cpu] = (
            env,
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        )
    built = {}
    for cpu, (env, proc) in started.items():
        out, err = proc.communicate(timeout=900)
        built[cpu] = (env, out.split() if proc.returncode == 0 else None, err[-2000:])
    return built


@pytest.mark.parametrize("cpu", list(OTHER_CPUS))
def test_native_step_as_other_cpus_build_it(other_builds, cpu, tmp_path):
    """The native step built as a CPU with AVX-512 but neither BF16 nor VNNI (the integer products' portable loops),
    and as one without AVX-512 at all (its portable loops, which Arm compiles too), passes the native tests against
    the Python step."""
    env, paths, log = other_builds[cpu]
    assert paths == [OTHER_CPUS[cpu][1]], log
    tests = "native and not other_cpus"
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests]
    result = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]


# (query heads, kv heads, head dim): each group size and head dim the 16-lane paths take apart (values in one pass
# for 1 to 4 rows, in pairs of 16 dims for 5 to 8, 16 dims at a time at D = 48, two sets of sums for few rows; keys
# 8 rows at a time, so 9 rows make two passes), and the portable loops: scoring at head dims other than 64, 128 and
# 256, values for groups of more than 8 rows
HEADS = [
    (6, 2, 64),
    (6, 2, 128),
    (6, 2, 48),
    (2, 2, 64),
    (4, 2, 128),
    (4, 4, 256),
    (8, 1, 256),
    (14, 2, 64),
    (10, 1, 80),
    (9, 1, 64),
]


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "H{}-Hkv{}-D{}".format(*h))
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_native_attention_kernel(kernels, heads, kind):
    """The step's attention alone against softmax attention in float64 over the same (dequantized) keys: a
    ragged number of keys, a mask with holes and whole blocks hidden, grouped query heads."""
    from streamllm.core.store import dequantize, quantize

    H, Hkv, D = heads
    g = torch.Generator().manual_seed(H * D)
    N = 300  # two whole blocks of 128 keys and a ragged one
    q = torch.randn(H, D, generator=g)
    keys, values = torch.randn(Hkv, N, D, generator=g) * 2, torch.randn(Hkv, N, D, generator=g)
    visible = torch.rand(N, generator=g) > 0.3
    visible[130:256] = False  # a block with nothing to see
    none = torch.empty(0)
    if kind == "int8":
        (kq, ks), (vq, vs) = quantize(keys), quantize(values)
        args = (kq, vq, ks, vs)
        keys, values = dequantize(kq, ks, torch.float32), dequantize(vq, vs, torch.float32)
    else:
        dtype = getattr(torch, kind)
        args = (keys.to(dtype), values.to(dtype), none, none)
        keys, values = args[0].float(), args[1].float()
    got = kernels.attend(q, *args, visible, D**-0.5)
    k, v = keys.double().repeat_interleave(H // Hkv, 0), values.double().repeat_interleave(H // Hkv, 0)
    scores = (q.double()[:, None] @ k.transpose(1, 2))[:, 0] * D**-0.5  # (H, N)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    want = (weights[:, None] @ v)[:, 0]  # (H, D)
    assert (got.double() - want).abs().max() < 1e-5
