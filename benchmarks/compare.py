"""Two checkouts of streamllm side by side, in one run on one machine: decode, chunked perplexity and batched decode.

    .venv/bin/python benchmarks/compare.py --tree before=/path/to/old/checkout --tree after=. [--repeats 3]

Each figure is measured in a fresh subprocess per checkout (its ``src`` first on ``PYTHONPATH``), alternating
between the checkouts ``--repeats`` times, and the best run of each is kept, so that both columns see the same
machine state. A checkout may have its own ``STREAMLLM_HOME`` (``--tree NAME=DIR@HOME``), so that two versions
of the native kernels do not rebuild over each other; its models folder can be a link to the shared one.

Figures (SmolLM2-135M, 2 threads):
- decode tok/s at a full 4+1020 cache, float32, bfloat16 and int4 (bfloat16 activations), one token at a time;
- chunked perplexity tok/s over ``--ppl-tokens`` tokens of Hamlet, chunks of 512, float32 and bfloat16;
- batched decode: 16 sessions with full 4+1020 caches, one token each per native pass, float32, tokens/s;
- saving a session at a full 4+1020 cache, float32, saves/s (median of ``--steps``): a whole state file
  (``persist.encode_state``, 47 MB) and a journal record of 32 decoded tokens (``journal.encode_record``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CASES = {
    "decode float32": ("decode", {"dtype": "float32", "decode": "fast"}),
    "decode bfloat16": ("decode", {"dtype": "bfloat16", "decode": "fast"}),
    "decode int4": ("decode", {"dtype": "bfloat16", "decode": "int4"}),
    "perplexity float32": ("perplexity", {"dtype": "float32"}),
    "perplexity bfloat16": ("perplexity", {"dtype": "bfloat16"}),
    "batched 16 float32": ("batched", {"dtype": "float32", "rows": 16}),
    "save whole float32": ("save", {"dtype": "float32", "part": "whole"}),
    "save record float32": ("save", {"dtype": "float32", "part": "record"}),
}
UNITS = {"save": "saves/s"}

# Runs inside the subprocess, against whichever streamllm its PYTHONPATH finds first.
WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(2)
import streamllm
from streamllm import StreamConfig, Stream, load_model
from streamllm.data import shakespeare_text
kind, opts = sys.argv[1], json.loads(sys.argv[2])
model, tok = load_model("smollm2-135m", dtype=opts["dtype"])
ids = tok.encode(shakespeare_text("hamlet"), add_special_tokens=False)
if kind == "decode":
    stream = Stream(model, StreamConfig(decode=opts["decode"]))
    stream.feed(ids[:1024])
    for t in ids[1024:1032]:
        stream.feed([t])
    start = time.perf_counter()
    for t in ids[1032:1032 + opts["tokens"]]:
        stream.feed([t])
    rate = opts["tokens"] / (time.perf_counter() - start)
elif kind == "perplexity":
    try:
        from streamllm.runtime.perplexity import streaming_nll
    except ImportError:
        from streamllm.perplexity import streaming_nll
    n = opts["ppl_tokens"]
    rate = streaming_nll(model, ids[:n], StreamConfig(chunk_size=512)).tok_per_s
elif kind == "save":
    from array import array
    from streamllm.server.journal import encode_record
    from streamllm.server.persist import Conversation, encode_state
    stream = Stream(model, StreamConfig())
    stream.feed(ids[:1024])
    convo = Conversation()
    convo.extend(b"x" * 1024, ids[:1024])
    log = (b"x" * 1024, array("i", ids[:1024]))
    save = lambda: encode_state("s" * 32, "owner", "m", stream.config, convo, stream, log)
    if opts["part"] == "record":
        meta, _ = save()
        meta["journal"] = {"file": "journal-00000001.bin", "bytes": 0}
        stream.cache.mark_saved()
        convo.saved()
        for t in ids[1024:1056]:
            stream.feed([t])
        convo.extend(b"y" * 32, ids[1024:1056])
        save = lambda: encode_record(meta, convo, stream)
    times = []
    for _ in range(opts["steps"]):
        start = time.perf_counter()
        save()
        times.append(time.perf_counter() - start)
    rate = 1 / sorted(times)[len(times) // 2]
else:
    streams = [Stream(model, StreamConfig()) for _ in range(opts["rows"])]
    for s in streams:
        s.feed(ids[:1024])
    try:
        from streamllm.backends.batched import decode_step
        step = lambda tokens: decode_step(model, [s.cache for s in streams], tokens, streams[0].decoder)
    except ImportError:
        from streamllm.server.batching import decode_step
        step = lambda tokens: decode_step(model, streams, tokens)
    times = []
    for i in range(opts["steps"]):
        tokens = [ids[1024 + i]] * len(streams)
        start = time.perf_counter()
        step(tokens)
        times.append(time.perf_counter() - start)
    rate = len(streams) / sorted(times)[len(times) // 2]
print(json.dumps({"rate": rate, "streamllm": streamllm.__file__}))
"""


def run_case(tree: Path, home: str | None, kind: str, opts: dict) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    if home:
        env["STREAMLLM_HOME"] = home
    out = subprocess.run(
        [sys.executable, "-c", WORKER, kind, json.dumps(opts)], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {kind} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["streamllm"].startswith(str(tree.resolve() / "src")):
        raise SystemExit(f"{tree}: imported {result['streamllm']}, not this checkout")
    return result["rate"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=DIR or NAME=DIR@STREAMLLM_HOME")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens per decode run")
    p.add_argument("--ppl-tokens", type=int, default=3100)
    p.add_argument("--steps", type=int, default=10, help="batched steps per run (median kept)")
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()
    trees = []
    for spec in args.tree:
        name, _, rest = spec.partition("=")
        path, _, home = rest.partition("@")
        trees.append((name, Path(path).resolve(), home or None))
    flags = set(Path("/proc/cpuinfo").read_text().split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    print(f"CPU: {cpu_name()} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} cores, torch threads 2\n")
    names = [t[0] for t in trees]
    print("| figure | " + " | ".join(names) + " | " + " / ".join(names[::-1]) + " |")
    print("|---|" + "---|" * (len(names) + 1))
    for case in args.cases.split(","):
        kind, opts = CASES[case]
        opts = dict(opts, tokens=args.tokens, ppl_tokens=args.ppl_tokens, steps=args.steps)
        best = {name: 0.0 for name in names}
        for _ in range(args.repeats):
            for name, tree, home in trees:
                best[name] = max(best[name], run_case(tree, home, kind, opts))
        ratio = best[names[-1]] / best[names[0]] if len(names) > 1 else 1.0
        cells = " | ".join(f"{best[n]:.1f}" for n in names)
        print(f"| {case} ({UNITS.get(kind, 'tok/s')}) | {cells} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
