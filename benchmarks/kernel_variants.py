"""Variants of the native kernels built side by side and timed in one process on a token's matrix products.

    .venv/bin/python benchmarks/kernel_variants.py [--rounds 15] [--sets bf16,f32,int4,mkl] [NAME=EDITS ...]

Each variant is ``decode_kernels.cpp`` with some text replaced, ``NAME=OLD->NEW`` (several edits joined by ``|``;
``base=`` is the source as it is), built under its own name. The matrices are SmolLM2-135M's shapes with random
values: 30 layers of qkv (960, 576), o (576, 576), gate_up (3072, 576) and down (576, 1536), and the output layer
(49152, 576). Sets: ``bf16`` and ``f32`` (the model's own weights, the one-row product), ``int4`` (4-bit tiles, the
output layer in 8 bits, as the int4 path holds them), ``mkl`` (torch's float32 matrix-vector product on the
``f32`` matrices, for reference, timed once a round). Every round times each variant on each set in a new
random order; the table gives the median (the first round dropped) and the bytes read per second. For example,
the runs per thread and the prefetch distance:

    benchmarks/kernel_variants.py base= "r2=thread_runs = runs_for_cpu();->thread_runs = 2;" \\
        "a8k=W_AHEAD = 4096;->W_AHEAD = 8192;|TILES_AHEAD = 4096;->TILES_AHEAD = 8192;"
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from streamllm.backends import native, quant
from streamllm.experiments.report import machine

SOURCE = Path(__file__).resolve().parent.parent / "src" / "streamllm" / "backends" / "decode_kernels.cpp"
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD = (49152, 576)


def build(name: str, edits: str, folder: Path):
    """The kernels with ``edits`` (``OLD->NEW|OLD->NEW``) applied, built under a name of their own."""
    text = SOURCE.read_text()
    for edit in filter(None, edits.split("|")):
        old, sep, new = edit.partition("->")
        if not sep or old not in text:
            raise SystemExit(f"variant {name}: {edit!r} is not OLD->NEW with OLD in the source")
        text = text.replace(old, new)
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    where = folder / f"{name}-{digest}"
    where.mkdir(parents=True, exist_ok=True)
    (where / "kernels.cpp").write_text(text)
    return cpp_extension.load(
        name=f"variant_{name}_{digest}",
        sources=[str(where / "kernels.cpp")],
        build_directory=str(where),
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )


def matrices(sets: list[str]) -> dict[str, list[tuple]]:
    """(kind, tensor, second tensor, x) per product of one token, for each set."""
    shapes = LAYER * 30 + [HEAD]
    out = {}
    if "bf16" in sets:
        ws = [torch.randn(s).mul_(0.05).bfloat16() for s in shapes]
        out["bf16"] = [(0, w, native.NONE, torch.randn(1, w.shape[1]).bfloat16()) for w in ws]
    if "f32" in sets or "mkl" in sets:
        ws = [torch.randn(s).mul_(0.05) for s in shapes]
        f32 = [(0, w, native.NONE, torch.randn(1, w.shape[1])) for w in ws]
        if "f32" in sets:
            out["f32"] = f32
        if "mkl" in sets:
            out["mkl"] = [(None, w, native.NONE, x[0]) for _, w, _, x in f32]
    if "int4" in sets:
        held = [quant.Int4MatVec(torch.randn(s) * 0.05) for s in LAYER * 30]
        held.append(quant.Int8MatVec(torch.randn(HEAD) * 0.05))
        out["int4"] = [(m.KIND, *m.tensors, torch.randn(1, s[1])) for m, s in zip(held, shapes, strict=True)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "variants", nargs="+", help="NAME=EDITS, EDITS being OLD->NEW joined by | (base= for none)"
    )
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--sets", default="bf16,f32,int4")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if native.kernels() is None:
        raise SystemExit("the native kernels do not build here (no compiler, or STREAMLLM_NATIVE=0)")
    sets = args.sets.split(",")
    unknown = set(sets) - {"bf16", "f32", "int4", "mkl"}
    if unknown:
        raise SystemExit(f"unknown sets: {', '.join(sorted(unknown))} (bf16, f32, int4, mkl)")
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}
        for spec in args.variants:
            name, sep, edits = spec.partition("=")
            if not sep or not name.isidentifier():
                raise SystemExit(f"{spec!r}: a variant is NAME=EDITS, NAME a plain word")
            variants[name] = build(name, edits, Path(tmp))
        products = matrices(sets)
        nbytes = {s: sum(a.nbytes + b.nbytes for _, a, b, _ in rows) for s, rows in products.items()}
        # MKL's product is the same whatever the variant: it is timed once a round, as a variant of its own
        times = {(v, s): [] for v in variants for s in products if s != "mkl"}
        if "mkl" in products:
            times[("MKL", "mkl")] = []
        for _ in range(args.rounds):
            order = list(times)
            random.shuffle(order)
            for v, s in order:
                module = variants.get(v)
                start = time.perf_counter()
                for kind, a, b, x in products[s]:
                    if kind is None:
                        torch.mv(a, x)
                    else:
                        module.matmul(kind, a, b, x)
                times[(v, s)].append(time.perf_counter() - start)
    print(f"A token's products, {args.rounds} shuffled rounds; {machine()}")
    print("| variant | set | ms (median) | GB/s |\n|---|---|---|---|")
    for (v, s), ts in sorted(times.items(), key=lambda item: (item[0][1], item[0][0])):
        ms = statistics.median(ts[1:] or ts)
        print(f"| {v} | {s} | {1000 * ms:.2f} | {nbytes[s] / ms / 1e9:.1f} |")


if __name__ == "__main__":
    main()
