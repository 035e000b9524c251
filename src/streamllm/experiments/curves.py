"""The paper's perplexity experiments: methods (Fig. 3), sinks (Table 2), cache size (Table 6), newline sinks
(Sec. 3.1), positions (cache vs text positions) and the long stream (Fig. 5)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import torch

from ..backends.arch import alibi_slopes
from ..config import MemoryConfig, StreamConfig
from ..runtime.perplexity import iter_nll, recompute_nll, streaming_nll
from ..sysinfo import current_rss_mb
from .context import Context
from .report import Report, figure, table

log = logging.getLogger(__name__)


def nll_curve(ctx: Context, ids: list[int], config: StreamConfig, desc: str) -> torch.Tensor:
    """Per-token NLL (N-1,) of ``ids`` under ``config``, computed in exact chunks."""
    with ctx.progress(len(ids), desc) as bar:
        return streaming_nll(ctx.model, ids, config, on_chunk=bar.update).nll


def ppl(nll: torch.Tensor) -> float:
    return math.exp(float(nll.double().mean())) if nll.numel() else float("nan")


def binned(nll: torch.Tensor, width: int) -> list[tuple[int, int, float]]:
    """(first token, last token, mean NLL) per bin of ``width`` tokens; nll[k] belongs to token k + 1."""
    return [
        (start + 1, min(start + width, nll.numel()), float(nll[start : start + width].double().mean()))
        for start in range(0, nll.numel(), width)
    ]


def _curve_plot(curves: dict[str, list[tuple[int, int, float]]], title: str, mark: int | None = None):
    fig, axes = figure()
    ax = axes[0, 0]
    for label, rows in curves.items():
        ax.plot([(a + b) / 2 for a, b, _ in rows], [y for _, _, y in rows], label=label, lw=1.2)
    if mark:
        ax.axvline(mark, color="grey", ls=":", lw=1)
        ax.text(mark, ax.get_ylim()[1], " pre-training length", va="top", fontsize=8, color="grey")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("log perplexity (mean NLL per bin)")
    ax.set_title(title)
    ax.legend()
    return fig


def _bar_plot(labels: list[str], values: list[float], title: str, xlabel: str):
    fig, axes = figure(size=(7, 4))
    ax = axes[0, 0]
    ax.bar(labels, values, color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    return fig


def methods(ctx: Context) -> Report:
    """Paper Fig. 3: dense, window, recompute and sink on one long text."""
    n, window, bin_width, stride = (400, 60, 50, 10) if ctx.quick else (20_000, 1020, 250, 100)
    ids = ctx.text_ids(n)
    sink = StreamConfig(num_sinks=4, window=window)
    curves, nlls = {}, {}
    for method in ("dense", "window", "sink"):
        nlls[method] = nll_curve(ctx, ids, StreamConfig(num_sinks=4, window=window, method=method), method)
    rotary = alibi_slopes(ctx.model.config) is None  # memory places what it recalls by rotary
    if rotary:
        memory = ctx.memory_or(MemoryConfig(block_size=16) if ctx.quick else MemoryConfig())
        nlls["sink + memory"] = nll_curve(ctx, ids, replace(sink, memory=memory), "sink + memory")
    # Recompute costs a forward of cache_size + 1 tokens per token: it is scored on every stride-th token.
    sample = list(range(stride, len(ids), stride))
    with ctx.progress(len(sample), "recompute") as bar:
        rec = recompute_nll(ctx.model, ids, sink.cache_size, sample, on_batch=bar.update)
    for method, nll in nlls.items():
        curves[method] = binned(nll, bin_width)
    curves["recompute (sampled)"] = [(t, t, float(x)) for t, x in zip(sample, rec.tolist(), strict=True)]
    per_bin = max(1, 4 * bin_width // stride)  # single tokens are noisy: plot means of this many samples
    plotted = dict(curves)
    plotted["recompute (sampled)"] = [
        (sample[i], sample[min(i + per_bin, len(sample)) - 1], float(rec[i : i + per_bin].double().mean()))
        for i in range(0, len(sample), per_bin)
    ]
    picked = torch.tensor(sample) - 1  # nll index of each sampled token
    limit = ctx.max_positions
    # method, then perplexities ("-" where a method has none)
    rows: list[tuple[str, float | str, float, float | str]] = []
    for method, nll in nlls.items():
        past = nll[limit - 1 :] if limit and nll.numel() >= limit else nll[:0]
        rows.append((method, ppl(nll), ppl(nll[picked]), ppl(past) if past.numel() else "-"))
    rec_past = rec[torch.tensor(sample) > limit] if limit else rec[:0]
    rows.append(("recompute", "-", ppl(rec), ppl(rec_past) if rec_past.numel() else "-"))
    csv_rows = [(m, a, b, f"{y:.5f}") for m, c in curves.items() for a, b, y in c]
    past_label = f"past token {limit}" if limit else "past its context (none known)"
    header = ("method", "perplexity, all tokens", f"on every {stride}th token", past_label)
    report = Report(
        "methods",
        f"Methods: dense, window, recompute, sink ({len(ids)} tokens, cache {sink.cache_size})",
        ctx.command,
        ("method", "first_token", "last_token", "mean_nll"),
        csv_rows,
    )
    report.sections.append(table(header, rows))
    if not rotary:
        report.sections.append(
            "No sink + memory row: memory places recalled tokens by rotary, and ALiBi has none."
        )
    report.sections.append(
        f"Recompute rebuilds a {sink.cache_size + 1}-token window for every token it scores, so it is scored on "
        f"every {stride}th token; the third column scores every method on those same tokens."
    )
    report.figure = _curve_plot(plotted, f"{ctx.model_name}: methods, cache {sink.cache_size}", limit)
    return report


def _ppl_table(
    ctx: Context, name: str, title: str, configs: dict[str, StreamConfig], ids: list[int], xlabel: str
):
    rows = []
    for label, config in configs.items():
        start = time.perf_counter()
        nll = nll_curve(ctx, ids, config, label)
        rows.append((label, ppl(nll), round(len(ids) / (time.perf_counter() - start), 1)))
    report = Report(
        name, f"{title} ({len(ids)} tokens)", ctx.command, ("config", "perplexity", "tok_per_s"), rows
    )
    report.sections.append(table(("cache config", "perplexity", "tok/s"), rows))
    report.figure = _bar_plot(
        [r[0] for r in rows], [r[1] for r in rows], f"{ctx.model_name}: {title}", xlabel
    )
    return report


def sinks(ctx: Context) -> Report:
    """Paper Table 2: 0, 1, 2, 4 and 8 sinks at a fixed cache size."""
    n, cache = (300, 64) if ctx.quick else (20_000, 1024)
    configs = {f"{s}+{cache - s}": StreamConfig(num_sinks=s, window=cache - s) for s in (0, 1, 2, 4, 8)}
    return _ppl_table(
        ctx, "sinks", f"Number of sinks at cache {cache}", configs, ctx.text_ids(n), "sinks + window"
    )


def cache_size(ctx: Context) -> Report:
    """Paper Table 6: 4 sinks with growing windows."""
    n, windows = (300, (28, 60)) if ctx.quick else (20_000, (252, 508, 1020, 2044))
    configs = {f"4+{w}": StreamConfig(num_sinks=4, window=w) for w in windows}
    return _ppl_table(
        ctx, "cache-size", "Cache size with 4 sinks", configs, ctx.text_ids(n), "sinks + window"
    )


def newline_sinks(ctx: Context) -> Report:
    """Paper Sec. 3.1: the first 4 tokens replaced by newlines still work as sinks: position, not meaning."""
    n, window = (300, 60) if ctx.quick else (20_000, 1020)
    ids = ctx.text_ids(n)
    newline = ctx.encode("\n")[-1]
    swapped = [newline] * 4 + ids[4:]
    rows = []
    for label, stream, method in (
        ("window (no sinks)", ids, "window"),
        ("4 sinks: the text's first 4 tokens", ids, "sink"),
        ('4 sinks: "\\n" x 4', swapped, "sink"),
    ):
        nll = nll_curve(ctx, stream, StreamConfig(num_sinks=4, window=window, method=method), label)
        rows.append((label, ppl(nll[4:])))  # the same scored tokens in every row
    report = Report(
        "newline-sinks",
        f"Newline sinks ({len(ids)} tokens, cache 4+{window})",
        ctx.command,
        ("config", "perplexity"),
        rows,
    )
    report.sections.append(table(("cache", "perplexity (tokens 5 onwards)"), rows))
    report.figure = _bar_plot(
        [r[0] for r in rows], [r[1] for r in rows], f"{ctx.model_name}: newline sinks", ""
    )
    return report


def memory(ctx: Context) -> Report:
    """Sink with memory of evicted blocks against plain sink, under both rules for where recalled tokens sit."""
    n, window, block = (600, 60, 16) if ctx.quick else (20_000, 1020, MemoryConfig().block_size)
    memory = ctx.memory_or(MemoryConfig(block_size=block))
    configs = {
        "sink": StreamConfig(num_sinks=4, window=window),
        "sink + memory, cache positions": StreamConfig(
            num_sinks=4, window=window, memory=replace(memory, positions="cache")
        ),
        "sink + memory, fixed distance": StreamConfig(
            num_sinks=4, window=window, memory=replace(memory, positions="fixed")
        ),
    }
    return _ppl_table(
        ctx, "memory", f"Memory of evicted blocks, cache 4+{window}", configs, ctx.text_ids(n), "method"
    )


def positions(ctx: Context) -> Report:
    """Sinks at in-cache positions (the paper) against sinks at text positions, well past the model's
    pre-training length, with window and dense attention for reference."""
    n, window, bin_width = (400, 60, 50) if ctx.quick else (30_000, 1020, 500)
    ids = ctx.text_ids(n)
    configs = {
        "sink, cache positions": StreamConfig(num_sinks=4, window=window),
        "sink, text positions": StreamConfig(num_sinks=4, window=window, positions="text"),
        "window": StreamConfig(num_sinks=4, window=window, method="window"),
        "dense": StreamConfig(num_sinks=4, window=window, method="dense"),
    }
    limit = ctx.max_positions or len(ids)
    nlls = {label: nll_curve(ctx, ids, config, label) for label, config in configs.items()}
    last = max(1, len(ids) // 6)
    rows = [
        (label, ppl(nll), ppl(nll[limit - 1 :]) if nll.numel() >= limit else "-", ppl(nll[-last:]))
        for label, nll in nlls.items()
    ]
    curves = {label: binned(nll, bin_width) for label, nll in nlls.items()}
    report = Report(
        "positions",
        f"Positions of the sinks: in-cache against text ({len(ids)} tokens, cache 4+{window})",
        ctx.command,
        ("config", "first_token", "last_token", "mean_nll"),
        [(m, a, b, f"{y:.5f}") for m, c in curves.items() for a, b, y in c],
    )
    header = ("config", "perplexity, all tokens", f"past token {limit}", f"last {last} tokens")
    report.sections.append(table(header, rows))
    report.figure = _curve_plot(
        curves, f"{ctx.model_name}: sink positions, cache 4+{window}", ctx.max_positions
    )
    return report


def long(ctx: Context) -> Report:
    """Paper Fig. 5: perplexity and memory per segment over millions of streamed tokens (the texts, chained and
    repeated end to end; a repeat is millions of tokens past anything the cache can hold)."""
    total, segment, window = (3_000, 500, 60) if ctx.quick else (4_000_000, 10_000, 1020)
    total = ctx.tokens or total
    config = StreamConfig(num_sinks=4, window=window)
    texts = enumerate(ctx.text_pieces("hamlet", cycle=True))
    pieces = _take((ctx.encode(text, first=n == 0) for n, text in texts), total)
    rows, done, start = [], 1, time.perf_counter()  # done counts tokens streamed; the first is never scored
    with ctx.progress(total, "long") as bar:
        last = start
        for done, seg_nll in _segments(iter_nll(ctx.model, pieces, config), segment, bar):
            now = time.perf_counter()
            scored = len(seg_nll)
            rows.append(
                (done, round(ppl(seg_nll), 4), round(current_rss_mb(), 1), round(scored / (now - last), 1))
            )
            last = now
            bar.set_postfix_str(f"ppl {rows[-1][1]:.2f} rss {rows[-1][2]:.0f}MB")
            log.info("long: %d tokens, segment ppl %.3f, RSS %.1f MB, %.0f tok/s", *rows[-1])
    seconds = time.perf_counter() - start
    report = Report(
        "long",
        f"Long stream: {done} tokens, cache 4+{window}, segments of {segment}",
        ctx.command,
        ("tokens", "segment_ppl", "rss_mb", "tok_per_s"),
        rows,
    )
    rss = [r[2] for r in rows]
    seg = [r[1] for r in rows]
    tenth = max(1, len(rows) // 10)
    summary = [
        ("segments", len(rows)),
        (
            "perplexity, first / last 10% of segments",
            f"{_gmean(seg[:tenth]):.3f} / {_gmean(seg[-tenth:]):.3f}",
        ),
        (
            "segment perplexity, min / median / max",
            f"{min(seg):.3f} / {sorted(seg)[len(seg) // 2]:.3f} / {max(seg):.3f}",
        ),
        (
            "RSS, first / last segment (MB)",
            f"{rss[0]:.1f} / {rss[-1]:.1f} ({100 * (rss[-1] / rss[0] - 1):+.2f}%)",
        ),
        ("run time", f"{seconds / 60:.1f} min ({done / seconds:.0f} tok/s)"),
    ]
    report.sections.append(table(("figure", "value"), summary))
    step = max(1, len(rows) // 20)
    report.sections.append(table(("tokens", "segment perplexity", "RSS MB", "tok/s"), rows[step - 1 :: step]))
    fig, axes = figure()
    ax = axes[0, 0]
    ax.plot([r[0] for r in rows], seg, lw=0.8, color="tab:blue")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel(f"perplexity per {segment}-token segment", color="tab:blue")
    ax.set_yscale("log")
    mem = ax.twinx()
    mem.plot([r[0] for r in rows], rss, color="tab:red", lw=1.2)
    mem.set_ylabel("process RSS (MB)", color="tab:red")
    mem.set_ylim(0, max(rss) * 1.3)
    ax.set_title(f"{ctx.model_name}: {done:,} tokens, cache 4+{window}")
    report.figure = fig
    return report


def _gmean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _segments(nlls, segment: int, bar):
    """Regroup per-chunk NLLs into segments of ``segment`` scored tokens: yields (tokens streamed at the segment's
    end, its NLLs); the last segment may be shorter."""
    done, held = 1, []
    for nll in nlls:
        bar.update(nll.numel())
        held.append(nll)
        joined = torch.cat(held)
        while joined.numel() >= segment:
            done += segment
            yield done, joined[:segment]
            joined = joined[segment:]
        held = [joined]
    if held and held[0].numel():
        yield done + held[0].numel(), held[0]


def _take(pieces, total: int):
    """Token pieces cut off after ``total`` tokens."""
    left = total
    for piece in pieces:
        if left <= 0:
            return
        yield piece[:left]
        left -= len(piece)
