"""``streamllm pretrain``: paper Sec. 3.3 on a CPU. Small Llama-architecture models trained from scratch (vanilla,
with a sink token, with a zero sink), then streamed through the engine.

- ``streamllm pretrain corpus``: fetch the corpus and train the tokenizer (cached under $STREAMLLM_HOME)
- ``streamllm pretrain train --run NAME``: start or resume a run (settings are fixed when it starts)
- ``streamllm pretrain status --run NAME``: steps, losses and sink shares so far
- ``streamllm pretrain eval --run NAME --out DIR``: pretrain.csv, pretrain.md, pretrain.png
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from .common import InputError, positive


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train small models with and without a sink token (paper Sec. 3.3)"
    )
    ps = p.add_subparsers(dest="action", required=True)
    c = ps.add_parser("corpus", help="fetch the corpus and train the tokenizer")
    c.add_argument(
        "--data", type=Path, default=None, help="token folder (default $STREAMLLM_HOME/pretrain/data)"
    )
    c.set_defaults(run=run_corpus)
    t = ps.add_parser(
        "train", help="start or resume a run; every turn of --segment steps ends with a checkpoint"
    )
    _run_arg(t)
    t.add_argument(
        "--data", type=Path, default=None, help="token folder (default $STREAMLLM_HOME/pretrain/data)"
    )
    t.add_argument("--steps", type=positive, default=None, help="steps per variant (default 1200)")
    t.add_argument("--batch-size", type=positive, default=None, help="sequences per step (default 16)")
    t.add_argument("--seq-len", type=positive, default=None, help="training sequence length (default 512)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    t.add_argument(
        "--weight-decay", type=float, default=None, help="AdamW weight decay on the matrices (default 0.1)"
    )
    t.add_argument("--segment", type=positive, default=None, help="steps per turn (default 50)")
    t.add_argument("--size", default=None, help="model shape HIDDEN,LAYERS,HEADS,FFN (default 256,6,4,688)")
    t.add_argument("--variants", default=None, help="comma-separated (default vanilla,sink-token,zero-sink)")
    t.add_argument("--max-turns", type=positive, default=None, help="stop after this many turns")
    t.add_argument(
        "--compute",
        choices=("auto", "float32", "bfloat16"),
        default=None,
        help="matrix products of training (default auto: bfloat16 autocast where this CPU has it natively, "
        "about twice as fast; weights and optimizer stay float32)",
    )
    t.add_argument("--threads", type=positive, default=1, help="torch threads (default 1)")
    t.set_defaults(run=run_train)
    s = ps.add_parser("status", help="where a run stands")
    _run_arg(s)
    s.set_defaults(run=run_status)
    e = ps.add_parser(
        "eval", help="Table 3: streaming perplexity with 0/1/2/4 sinks and recompute; sink shares"
    )
    _run_arg(e)
    e.add_argument("--out", type=Path, required=True, help="folder for pretrain.csv, .md and .png")
    e.add_argument("--tokens", type=positive, default=16384, help="held-out tokens streamed (default 16384)")
    e.add_argument("--cache", type=positive, default=256, help="cache size W (default 256)")
    e.add_argument("--stride", type=positive, default=8, help="recompute scores every STRIDE-th token")
    e.add_argument("--threads", type=positive, default=1, help="torch threads (default 1)")
    e.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    e.set_defaults(run=run_eval)


def _run_arg(p) -> None:
    p.add_argument(
        "--run",
        dest="run_name",
        default="main",
        help="run name, a folder under $STREAMLLM_HOME/pretrain/runs",
    )


def _folder(args) -> Path:
    from ..experiments.pretrain.train import runs_dir

    return runs_dir() / args.run_name


def run_corpus(args) -> int:
    from ..experiments.pretrain import data

    tokens = data.prepare(args.data)
    print(json.dumps(tokens.stats(), indent=1))
    print(tokens.folder)
    return 0


def _settings(args, data_folder: Path):
    from dataclasses import replace

    from ..defaults import native_bf16
    from ..experiments.pretrain.model import Shape
    from ..experiments.pretrain.train import Settings

    s = Settings(data=str(data_folder))
    picked = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "segment": args.segment,
    }
    s = replace(s, **{k: v for k, v in picked.items() if v is not None})
    if args.size:
        try:
            h, n, heads, ffn = (int(x) for x in args.size.split(","))
        except ValueError:
            raise InputError(f"--size wants HIDDEN,LAYERS,HEADS,FFN, got {args.size!r}") from None
        s = replace(s, shape=Shape(h, n, heads, ffn))
    if args.variants:
        s = replace(s, variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()))
    compute = args.compute or "auto"
    if compute == "auto":
        compute = "bfloat16" if native_bf16() else "float32"
    return replace(s, compute=compute)


def run_train(args) -> int:
    import torch

    from ..experiments.pretrain import data, train

    torch.set_num_threads(args.threads)
    folder = _folder(args)
    given = any(
        getattr(args, k) is not None
        for k in (
            "steps",
            "batch_size",
            "seq_len",
            "lr",
            "weight_decay",
            "segment",
            "size",
            "variants",
            "compute",
        )
    )
    if (folder / "settings.json").exists():
        settings = train.open_run(folder)
        if given:
            print(f"{folder}: resuming with its saved settings; the ones given are ignored", file=sys.stderr)
    else:
        tokens = data.prepare(args.data)
        try:
            settings = _settings(args, tokens.folder)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        train.open_run(folder, settings)
    print(f"run {folder}\n{settings.to_json()}", file=sys.stderr, flush=True)
    last = {"t": time.perf_counter()}

    def on_step(variant: str, step: int, loss: float, tok_s: float) -> None:
        if step % 10 == 0 or step == settings.steps:
            now = time.perf_counter()
            stamp = time.strftime("%H:%M:%S")
            print(
                f"{stamp} {variant:10s} step {step}/{settings.steps} loss {loss:.4f} {tok_s:.0f} tok/s "
                f"({now - last['t']:.0f} s since last line)",
                flush=True,
            )
            last["t"] = now

    done = train.train(folder, max_turns=args.max_turns, on_step=on_step)
    print(f"steps done: {done}", flush=True)
    return 0


def run_status(args) -> int:
    from ..experiments.pretrain import evaluate, train

    folder = _folder(args)
    s = train.open_run(folder)
    for variant in s.variants:
        steps = evaluate.read_jsonl(folder / variant / "log.jsonl")
        shares = evaluate.read_jsonl(folder / variant / "share.jsonl")
        done = train.steps_done(folder, variant)
        line = f"{variant:10s} checkpoint {done}/{s.steps}"
        if steps:
            recent = steps[-10:]
            loss = sum(r["loss"] for r in recent) / len(recent)
            secs = sum(r["seconds"] for r in recent) / len(recent)
            line += (
                f", logged step {steps[-1]['step']}, loss {loss:.3f}, {s.tokens_per_step / secs:.0f} tok/s"
            )
        if shares:
            last = shares[-1]
            line += f"; held-out loss {last['heldout_loss']:.3f}, pos-0 share per layer {last['pos0']}"
        print(line)
    return 0


def run_eval(args) -> int:
    import torch
    from tqdm import tqdm

    from ..experiments.pretrain import evaluate
    from ..experiments.report import Report

    torch.set_num_threads(args.threads)
    clash = [p for p in Report("pretrain", "", "", ()).paths(args.out) if p.exists()]
    if clash and not args.overwrite:
        raise InputError(f"{clash[0]} exists; pass --overwrite to replace it")
    folder = _folder(args)
    if not (folder / "settings.json").exists():
        raise InputError(f"no run in {folder}")
    command = "streamllm " + shlex.join(sys.argv[1:])
    with tqdm(desc="pretrain eval", unit="tok", file=sys.stderr, disable=None) as bar:
        report = evaluate.evaluate(folder, command, args.tokens, args.cache, args.stride, bar.update)
    for path in report.write(args.out):
        print(path)
    return 0
