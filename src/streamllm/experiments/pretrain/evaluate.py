"""Paper Table 3 at our scale: streaming perplexity of each variant on the held-out stream through the engine, with
caches 0+W, 1+(W-1), 2+(W-2), 4+(W-4) and sliding window with re-computation; and the share of attention on the
first tokens over training, read from the run's checkpoint probes.

Every variant is scored on the same text tokens (the held-out stream's tokens 1..N-1): the sink-token variant
streams ``<|sink|>`` first, and its prediction of token 0 from the sink alone is left out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ...config import StreamConfig
from ...runtime.perplexity import recompute_nll, streaming_nll
from ..report import Report, figure, table
from . import data as data_mod
from . import train as train_mod

SINKS = (0, 1, 2, 4)


def _ppl(nll: torch.Tensor) -> float:
    return math.exp(float(nll.double().mean()))


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a run log, the last one per step (a resumed turn writes its steps again; a line cut short by a
    killed run is skipped)."""
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


@torch.no_grad()
def variant_ppl(
    model, variant: str, text: list[int], sink_id: int, cache: int, stride: int, bar: Callable | None = None
) -> dict[str, float]:
    """Perplexity of ``text`` under each cache layout, and recompute's on every ``stride``-th token."""
    import streamllm

    streamllm.prepare(model)
    ids = [sink_id, *text] if variant == "sink-token" else list(text)
    lead = len(ids) - len(text)  # nll[k] is token k + 1's; the sink-token stream's token 0 is text token -1
    out, nll = {}, None
    for s in SINKS:
        nll = streaming_nll(model, ids, StreamConfig(num_sinks=s, window=cache - s)).nll  # (N-1,)
        out[f"{s}+{cache - s}"] = _ppl(nll[lead:])
        if bar:
            bar(len(ids))
    sample = list(range(lead + stride, len(ids), stride))
    out["recompute"] = _ppl(recompute_nll(model, ids, cache, sample))
    # SINKS is never empty: nll is its last layout's, the one compared with recompute on recompute's tokens
    assert nll is not None
    out[f"{SINKS[-1]}+{cache - SINKS[-1]}, recompute's tokens"] = _ppl(nll[torch.tensor(sample) - 1])
    if bar:
        bar(len(ids))
    return out


def evaluate(
    folder: Path,
    command: str,
    tokens: int = 16384,
    cache: int = 256,
    stride: int = 8,
    bar: Callable | None = None,
) -> Report:
    """The run's table (each variant's newest checkpoint), its sink-share history and both plots."""
    s = train_mod.open_run(folder)
    toks = data_mod.Tokens(Path(s.data))
    held = toks.stream("heldout")
    text = [int(t) for t in held[: min(tokens, len(held))]]
    rows, csv_rows = [], []
    results: dict[str, dict[str, float]] = {}
    for variant in s.variants:
        ckpt = train_mod.latest(folder, variant)
        if ckpt is None:
            continue
        step = train_mod.steps_done(folder, variant)
        model = train_mod.load_model(ckpt).eval()
        res = variant_ppl(model, variant, text, toks.sink_id, cache, stride, bar)
        results[variant] = res
        trained = step * s.tokens_per_step
        rows.append((variant, step, f"{trained / 1e6:.2f}M", *res.values()))
        csv_rows += [(variant, step, trained, k, f"{v:.4f}") for k, v in res.items()]
    columns = [f"{n}+{cache - n}" for n in SINKS]
    report = Report(
        "pretrain",
        f"Pre-training with a sink token (Sec. 3.3): {len(text)} held-out tokens, cache {cache}",
        command,
        ("variant", "step", "tokens_trained", "cache", "perplexity"),
        csv_rows,
    )
    report.sections.append(
        table(
            (
                "variant",
                "step",
                "tokens trained",
                *columns,
                f"recompute (every {stride}th token)",
                f"{columns[-1]} on those tokens",
            ),
            rows,
        )
    )
    report.sections.append(_observations(results, cache, s.steps, rows))
    shares = {v: read_jsonl(folder / v / "share.jsonl") for v in s.variants}
    report.sections.append(_share_table(shares))
    report.sections.append(_head_table(head_history(folder, s, toks)))
    report.figure = _plots(results, shares, cache, s)
    return report


def _observations(results: dict, cache: int, total: int, rows) -> str:
    lines = [f"Steps planned per variant: {total}."]
    if "vanilla" in results:
        r = results["vanilla"]
        lines.append(
            f"Vanilla: 0+{cache} / 4+{cache - 4} = {r[f'0+{cache}'] / r[f'4+{cache - 4}']:.3f} "
            "(the paper's first observation wants this clearly above 1)."
        )
    if "sink-token" in results:
        r = results["sink-token"]
        lines.append(
            f"Sink token: 1+{cache - 1} / 4+{cache - 4} = {r[f'1+{cache - 1}'] / r[f'4+{cache - 4}']:.4f} "
            "(the paper's second observation wants this within 1.01)."
        )
    return "\n\n".join(lines)


def _share_table(shares: dict[str, list[dict]]) -> str:
    rows = []
    for variant, history in shares.items():
        if not history:
            continue
        last = history[-1]
        for layer, (p0, p1, sc) in enumerate(
            zip(last["pos0"], last["pos1"], last["sink_column"], strict=True)
        ):
            rows.append((variant, last["step"], layer, p0, p1, "-" if sc is None else sc))
    head = (
        "variant",
        "step",
        "layer",
        "share on position 0",
        "share on position 1",
        "share on the zero sink",
    )
    note = (
        "Share of attention per layer at the newest checkpoint (held-out probe, mean over heads and queries "
        f"{train_mod.PROBE_SKIP}..end). Position 0 is the sink token in the sink-token model and an arbitrary "
        "text token in the others."
    )
    return note + "\n\n" + table(head, rows)


SINK_HEAD = 0.3  # a head "has a sink" when its mean share on the sink exceeds this (Gu et al., ICLR 2025)


@torch.no_grad()
def head_history(folder: Path, s, toks) -> dict[str, list[dict]]:
    """Per variant and kept checkpoint, the heads that put more than ``SINK_HEAD`` of their attention on position
    0 (and, for the zero sink, on its column): the probe's per-head shares, recomputed from the weights so that
    runs whose logs predate them are covered too."""
    x = train_mod.probe_batch(s, toks)
    out: dict[str, list[dict]] = {}
    for variant in s.variants:
        rows = []
        for step, ckpt in train_mod.kept_checkpoints(folder, variant):
            try:
                model = train_mod.load_model(ckpt).eval()
            except OSError:  # a running trainer replaced it since the listing
                continue
            res = train_mod.probe(model, variant, x, toks.sink_id)
            row = {"step": step, "tokens": step * s.tokens_per_step, "heads": 0}
            for key in ("pos0_heads", "sink_heads"):
                shares = [v for layer in res[key] if layer is not None for v in layer]
                if shares:
                    row["heads"] = len(shares)
                    row[key] = (sum(v > SINK_HEAD for v in shares), max(shares))
            rows.append(row)
        out[variant] = rows
    return out


def _head_table(history: dict[str, list[dict]]) -> str:
    rows = []
    for variant, steps in history.items():
        for r in steps:
            cells = []
            for key in ("pos0_heads", "sink_heads"):
                if key in r:
                    n, top = r[key]
                    cells.append(f"{n}/{r['heads']} (largest {top:.3f})")
                else:
                    cells.append("-")
            rows.append((variant, r["step"], f"{r['tokens'] / 1e6:.2f}M", *cells))
    head = (
        "variant",
        "step",
        "tokens trained",
        f"heads with > {SINK_HEAD} on position 0",
        f"heads with > {SINK_HEAD} on the zero sink",
    )
    note = (
        f"Sink heads at each kept checkpoint (the metric of Gu et al., ICLR 2025, with threshold {SINK_HEAD}: a "
        "head counts when its mean share of attention on the sink, over the probe's sequences and queries, "
        "exceeds it; the largest head's share beside)."
    )
    return note + "\n\n" + table(head, rows)


def _plots(results: dict, shares: dict, cache: int, s):
    fig, axes = figure(1, 2, size=(12, 4.2))
    ax = axes[0, 0]
    for variant, res in results.items():
        (line,) = ax.plot(SINKS, [res[f"{n}+{cache - n}"] for n in SINKS], marker="o", label=variant)
        ax.axhline(res["recompute"], color=line.get_color(), ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xticks(SINKS)
    ax.set_xlabel(f"sinks kept (cache {cache} in all; dotted: recompute)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Perplexity against number of sinks")
    ax.legend()
    ax = axes[0, 1]
    highest = 0.0
    for variant, history in shares.items():
        if not history:
            continue
        x = [h["tokens"] / 1e6 for h in history]
        (line,) = ax.plot(x, [sum(h["pos0"]) / len(h["pos0"]) for h in history], marker=".", label=variant)
        top = [max(h["pos0"]) for h in history]
        highest = max(highest, *top)
        ax.plot(x, top, color=line.get_color(), lw=0.8, alpha=0.5, label=f"{variant}: the layer with most")
        if history[-1]["sink_column"][0] is not None:
            zero = [sum(h["sink_column"]) / len(h["sink_column"]) for h in history]
            highest = max(highest, *zero)
            ax.plot(x, zero, ls="--", color=line.get_color(), label=f"{variant}: on the zero sink")
        if variant == "sink-token":
            first_text = [sum(h["pos1"]) / len(h["pos1"]) for h in history]
            ax.plot(x, first_text, ls=":", color=line.get_color(), label=f"{variant}: on position 1")
    ax.set_xlabel("training tokens (M)")
    # what position 0 would get if a query spread its attention evenly over the keys it sees
    queries = range(train_mod.PROBE_SKIP, s.seq_len)
    even = sum(1 / (q + 1) for q in queries) / len(queries)
    ax.axhline(even, color="grey", ls=":", lw=1, label="attention spread evenly")
    ax.set_ylabel("share of attention on position 0 (mean over layers)")
    ax.set_ylim(0, min(1.0, max(0.05, 1.25 * highest)))
    ax.set_title(f"Sink share during training (seq len {s.seq_len})")
    ax.legend(fontsize=8)
    return fig
