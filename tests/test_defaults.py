"""The default path ("auto"): bfloat16 where the CPU has it natively, int4 where the published weights are 4-bit
and it measured faster, ``--exact`` for the float32 reference; explicit choices win; and every summary says which
path produced it. CPUs other than this one are given as their /proc/cpuinfo flags."""

import json

import pytest
from cli_helpers import assert_one_line_error, run_here

from streamllm.defaults import choose, cpu_flags, native_bf16
from streamllm.models import BUILTINS

AMD_ZEN4 = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}  # AVX-512 BF16, no AMX
INTEL_SPR = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX2_ONLY = {"avx2", "fma", "f16c"}
ARM_BF16 = {"fp", "asimd", "sve", "bf16"}
ARM_OLD = {"fp", "asimd"}


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        (AMD_ZEN4, "bfloat16"),
        (INTEL_SPR, "bfloat16"),
        (AVX2_ONLY, "float32"),
        (ARM_BF16, "bfloat16"),
        (ARM_OLD, "float32"),
        (set(), "float32"),
    ],
)
def test_dtype_follows_native_bfloat16(flags, dtype):
    assert choose("smollm2-135m", flags=flags).dtype == dtype
    assert choose("smollm2-135m", flags=flags, exact=True).dtype == "float32"


def test_this_cpu_is_read():
    flags = cpu_flags()
    assert flags, "no flags in /proc/cpuinfo"
    assert (native_bf16() is not None) == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def test_decode_follows_the_published_weights():
    for name, entry in BUILTINS.items():
        for flags, dtype in ((AVX2_ONLY, "float32"), (AMD_ZEN4, "bfloat16")):
            chosen = choose(name, flags=flags)
            assert chosen.decode == entry.decode[dtype], name
            assert entry.weights in chosen.why
    assert choose("smollm2-135m", flags=INTEL_SPR).decode == "int4"
    assert choose("gemma3-270m", flags=INTEL_SPR).decode == "int4"  # measured faster in bfloat16 too
    assert choose("gemma3-270m", flags=AVX2_ONLY).decode == "int4"
    assert choose("smollm2-135m", exact=True).decode == "fast"
    assert choose("/some/hf-folder", flags=AVX2_ONLY).decode == "fast"


def test_explicit_choices_win():
    chosen = choose("smollm2-135m", "float32", "transformers", flags=INTEL_SPR)
    assert (chosen.dtype, chosen.decode, chosen.why) == ("float32", "transformers", "as asked")
    assert choose("smollm2-135m", "bfloat16", None, flags=AVX2_ONLY).dtype == "bfloat16"


def test_exact_refuses_a_contradiction(capsys):
    for extra in (["--dtype", "bfloat16"], ["--decode", "int4"]):
        result = run_here(capsys, "generate", "--prompt", "hi", "--exact", *extra)
        assert_one_line_error(result, "--exact means float32")


@pytest.mark.real
def test_exact_is_the_float32_reference_in_the_summary(capsys, tmp_path):
    """``--exact`` in a ``--json`` summary (the default path's summaries: ``test_cli.py``)."""
    text = tmp_path / "t.txt"
    text.write_text("The sea was calm and the ship sailed on through the night. " * 6)
    result = run_here(capsys, "perplexity", "--text", str(text), "--window", "28", "--json", "--exact")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["path"] == {"dtype": "float32", "decode": "fast", "why": "--exact", "kv_dtype": "model"}
