"""Decode and prefill throughput per dtype and decode path, beside llama.cpp and the memory-bandwidth bound.

    .venv/bin/python benchmarks/throughput.py [--dtypes float32,bfloat16] [--tokens 64] [--out DIR]

For each dtype, one stream (4 sinks + 1020 window) takes a 4096-token prompt of Hamlet in chunks (prefill tok/s),
then the next ``--tokens`` tokens of the text one at a time (decode tok/s at a full 1024-token cache), once per
decode path: transformers' forward, the fast path, and the fast path on 4-bit weights. All runs are in this one
process, side by side.

llama.cpp: with the optional ``llama-cpp-python`` package installed (``pip install -e '.[llamacpp]'``; it builds
from source in about 6 minutes), the same GGUF file the bundled model comes from is timed the same way: prefill of
the 4096-token prompt, then streaming decode in a 1024-token context with llama.cpp's own context shift. The context
is filled with 1020 tokens of the text, and each of the next ``--tokens`` tokens is decoded one at a time; whenever
the context is full, the first 4 tokens are kept, the next ``--discard`` (default 64) are removed and the rest
are shifted back (``llama_memory_seq_rm`` and ``llama_memory_seq_add``, as llama.cpp's examples do), so the
cache holds 960 to 1024 tokens: the same attention work per token as our full 4+1020 cache, and the shifts' own
cost is in the time. Without the package that column is skipped. On this machine (AMX) llama.cpp's default build
crashes in batched evaluation; it was built with AMX off and AVX-512 on:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
    -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF"
    .venv/bin/pip install --no-cache-dir "llama-cpp-python==0.3.36"

Bandwidth bound: every decoded token reads all weights and the whole cache once, so tokens/s can be no higher than
(measured read bandwidth) / (bytes of weights + cache). Each path is shown as a share of its own bound. The
read bandwidth is the faster of torch's sum and MKL's float32 matrix-vector product (``_bench.read_bandwidth_gbs``);
a path that reads faster than both shows above 100%. On a shared machine the bandwidth drifts by a third within
minutes, and on some machines by half within seconds, so decoding is paced: the tokens are decoded in chunks of
32, with a short reading (256 MB) before each chunk and after the last. Each chunk's share is its tokens/s over
the bound from the readings either side of it, and a row's share is the median over its chunks, so a chunk that a
neighbour slowed (or a reading it flattered) does not decide it. The decode tok/s column is the plain rate over
all the tokens, and the bound column uses the median reading.
Writes throughput.csv, throughput.md and throughput.png into --out.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from _bench import command, kv_bytes, parser, read_bandwidth_gbs, text_ids, weight_bytes

from streamllm import StreamConfig, load_model
from streamllm.experiments.report import Report, figure, machine, table
from streamllm.runtime.stream import Stream

PROMPT = 4096
CONTEXT = 1024  # llama.cpp's context: 4 kept + 1020, like our cache
PATHS = ("transformers", "fast", "int4")


def decoder_bytes(stream: Stream, model) -> int:
    """Bytes of weights one decoded token reads on this stream's path."""
    return weight_bytes(model) if stream.decoder is None else stream.decoder.weight_bytes()


CHUNK = 32  # tokens decoded between two bandwidth readings


def paced(decode_one, tokens: list, nbytes: int) -> dict:
    """Decode ``tokens`` one at a time with ``decode_one`` in chunks of CHUNK, reading the bandwidth before each
    chunk and after the last: the overall tok/s, the median reading, and the median over chunks of each chunk's
    tok/s as a share of the bound from the readings either side of it."""
    readings, seconds, shares = [read_bandwidth_gbs(256, 3)], 0.0, []
    for i in range(0, len(tokens), CHUNK):
        chunk = tokens[i : i + CHUNK]
        start = time.perf_counter()
        for token in chunk:
            decode_one(token)
        took = time.perf_counter() - start
        seconds += took
        readings.append(read_bandwidth_gbs(256, 3))
        bound = (readings[-2] + readings[-1]) / 2 * 1e9 / nbytes
        shares.append(len(chunk) / took / bound)
    return {
        "decode": len(tokens) / seconds,
        "bandwidth": statistics.median(readings),
        "share": statistics.median(shares),
    }


def ours(model, ids: list[int], decode: str, tokens: int) -> dict:
    stream = Stream(model, StreamConfig(num_sinks=4, window=1020, decode=decode))
    start = time.perf_counter()
    stream.feed(ids[:PROMPT])
    prefill = PROMPT / (time.perf_counter() - start)
    nbytes = decoder_bytes(stream, model) + stream.cache_bytes()
    decoded = paced(lambda token: stream.feed([token]), ids[PROMPT : PROMPT + tokens], nbytes)
    return {"prefill": prefill, "bytes": nbytes, **decoded}


def time_llama_cpp(
    gguf: Path, ids: list[int], tokens: int, threads: int, discard: int, cache_bytes: int
) -> dict:
    """The same measurements through llama.cpp (``_llama_cpp_row`` checks that it is installed)."""
    from llama_cpp import Llama

    big = Llama(model_path=str(gguf), n_ctx=PROMPT + 8, n_batch=512, n_threads=threads, verbose=False)
    start = time.perf_counter()
    big.eval(ids[:PROMPT])
    prefill = PROMPT / (time.perf_counter() - start)
    del big
    small = Llama(model_path=str(gguf), n_ctx=CONTEXT, n_batch=512, n_threads=threads, verbose=False)
    small.eval(ids[: CONTEXT - 4])
    shifts = 0

    def decode_one(token: int) -> None:
        nonlocal shifts
        if small.n_tokens == CONTEXT:
            _context_shift(small, 4, discard)
            shifts += 1
        small.eval([token])

    nbytes = gguf.stat().st_size + cache_bytes
    decoded = paced(decode_one, ids[CONTEXT - 4 : CONTEXT - 4 + tokens], nbytes)
    return {"prefill": prefill, "bytes": nbytes, "shifts": shifts, **decoded}


def _context_shift(llm, keep: int, discard: int) -> None:
    """llama.cpp's context shift: drop the ``discard`` tokens after the first ``keep`` and move the rest back."""
    n = llm.n_tokens
    llm._ctx.kv_cache_seq_rm(0, keep, keep + discard)
    llm._ctx.kv_cache_seq_shift(0, keep + discard, n, -discard)
    llm.input_ids[keep : n - discard] = llm.input_ids[keep + discard : n].copy()
    llm.n_tokens = n - discard


def main() -> None:
    p = parser(__doc__, "docs/performance")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument(
        "--gguf", type=Path, default=None, help="GGUF file for llama.cpp (default: the bundled model's)"
    )
    p.add_argument("--discard", type=int, default=64, help="tokens llama.cpp's context shift drops at a time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.model}, sink 4+1020, {args.threads} threads; read bandwidth measured between chunks of {CHUNK} tokens"
    )
    rows = []
    for dtype in args.dtypes.split(","):
        model, tokenizer = load_model(args.model, dtype=dtype)
        ids = text_ids(tokenizer, PROMPT + args.tokens)
        for path in PATHS:
            rows.append(
                {"runtime": "streamllm", "dtype": dtype, "path": path, **ours(model, ids, path, args.tokens)}
            )
            _print(rows[-1])
    cpp = _llama_cpp_row(args, model.config, ids)
    if cpp is None:
        print("llama.cpp: skipped (llama-cpp-python is not installed; pip install -e '.[llamacpp]')")
    else:
        rows.append(cpp)
        _print(cpp)
        print(f"llama.cpp: {cpp['shifts']} context shifts (keep 4, discard {args.discard}) during its decode")
        for r in rows[:-1]:
            print(f"{r['dtype']:9} {r['path']:12} decode / llama.cpp: {r['decode'] / cpp['decode']:.2f}x")
    _write(rows, args, cpp is not None)


def _llama_cpp_row(args, model_config, ids) -> dict | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    from streamllm.models import fetch_gguf

    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or fetch_gguf(args.model, Path(tmp))
        result = time_llama_cpp(
            gguf, ids, args.tokens, args.threads, args.discard, kv_bytes(model_config, CONTEXT, 2)
        )  # f16 cache
    return {"runtime": "llama.cpp", "dtype": "gguf", "path": "its own", **result}


def _bound(r: dict) -> float:
    return r["bandwidth"] * 1e9 / r["bytes"]


def _print(r: dict) -> None:
    bound = _bound(r)
    print(
        f"{r['runtime']:10} {r['dtype']:9} {r['path']:12} prefill {r['prefill']:7.1f} tok/s  decode {r['decode']:6.1f} "
        f"tok/s  bound {bound:6.1f} tok/s ({100 * r['share']:4.1f}% of it; {r['bytes'] / 2**20:.0f} MB/token, "
        f"read {r['bandwidth']:.1f} GB/s beside it)",
        flush=True,
    )


def _write(rows, args, have_cpp: bool) -> None:
    header = (
        "runtime",
        "dtype",
        "decode path",
        "prefill tok/s",
        "decode tok/s",
        "MB read per token",
        "read GB/s beside it",
        "bound tok/s",
        "% of bound",
    )
    body = []
    for r in rows:
        bound = _bound(r)
        body.append(
            (
                r["runtime"],
                r["dtype"],
                r["path"],
                round(r["prefill"], 1),
                round(r["decode"], 1),
                round(r["bytes"] / 2**20, 1),
                round(r["bandwidth"], 1),
                round(bound, 1),
                round(100 * r["share"], 1),
            )
        )
    report = Report(
        "throughput",
        f"Decode and prefill throughput ({args.model}, cache 4+1020, {PROMPT}-token prompt)",
        command(),
        header,
        body,
    )
    report.sections.append(
        f"Decoding paced in chunks of {CHUNK} tokens with a read-bandwidth reading between chunks; % of bound is the"
        " median over a row's chunks of each chunk's tok/s against the bound from the readings either side of it,"
        " and the bound column uses the row's median reading."
        + (
            f" llama.cpp decodes with its own context shift (keep 4, discard {args.discard})."
            if have_cpp
            else " llama.cpp: not installed, skipped."
        )
    )
    report.sections.append(table(header, body))
    fig, axes = figure()
    ax = axes[0, 0]
    labels = [f"{r['runtime']}\n{r['dtype']}\n{r['path']}" for r in rows]
    ax.bar(range(len(rows)), [r["decode"] for r in rows], color="tab:blue", label="decode tok/s")
    ax.scatter(
        range(len(rows)),
        [_bound(r) for r in rows],
        color="tab:red",
        marker="_",
        s=600,
        label="bandwidth bound",
    )
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("tokens/s")
    ax.legend()
    ax.set_title(f"{args.model}: decode at cache 1024\n{machine()}", fontsize=10)
    report.figure = fig
    for path in report.write(args.out):
        print("wrote", path)


if __name__ == "__main__":
    main()
