"""Passkey retrieval out to a million tokens: ten labelled keys hidden at spread depths in one long stream of
filler text, each asked for at the end.

    ... The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
    The pass key of door 3 is 40317. Remember it. 40317 is the pass key of door 3.
    ... (more filler, and the other doors' keys at their depths) ...
    What is the pass key of door 3? The pass key of door 3 is

One stream per (length, method) holds every key, so a million-token length costs one million-token stream, not
ten. At its end the stream's state is taken once; each question is asked, answered greedily, and the stream is
put back to that state (its memory drops what the question and answer added) before the next one, so every
question sees the same stream. A trial is right when the key's digits come first in the answer. Methods:
``sink`` (the paper), ``memory`` (sink with memory of evicted blocks: ``--memory-*`` options, else the defaults
with content selection), ``memory-attention`` (the same, blocks chosen by attention alone) and ``dense`` where
the model was trained on that length. Besides the heat maps, the longest memory stream records, per layer, the
blocks recalled for the middle door's question and whether the block holding its key was among them.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import replace

from ..config import MemoryConfig, StreamConfig
from ..runtime.stream import Stream
from .context import Context
from .report import Report, figure, table

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
LENGTHS = (4096, 16384, 65536, 262144, 1048576)
KEYS = 10
METHODS = ("sink", "memory", "memory-attention", "dense")
ANSWER_TOKENS = 8
CACHE = StreamConfig(num_sinks=4, window=1020)  # --quick: 4+252, memory blocks of 64
FEED = 4096  # tokens fed at a time (the stream chunks them further)


def key_text(door: int, key: str) -> str:
    return f"The pass key of door {door} is {key}. Remember it. {key} is the pass key of door {door}. "


def question_text(door: int) -> str:
    return f"What is the pass key of door {door}? The pass key of door {door} is"


def depths(keys: int, length: int, window: int) -> list[float]:
    """Where the keys sit (a share of the stream): the middle of each of ``keys`` equal parts of what has left a
    ``window``-token window when the questions come, so that no key is in view then and sink alone knows none.
    Several keys in view at once is a test the small models fail even with dense attention: they answer the
    latest key, whichever door is asked for."""
    span = max(0.0, 1 - (window + 64) / length)
    return [round(span * (i + 0.5) / keys, 3) for i in range(keys)]


def right(answer: str, key: str) -> bool:
    """Whether the first number in the answer is the key."""
    found = re.search(r"\d+", answer)
    return bool(found) and found.group(0) == key


def stream_ids(
    ctx: Context, length: int, keys: list[str], at_depths: list[float]
) -> tuple[list[int], list[int]]:
    """The stream before the questions (about ``length`` tokens, less the longest question), and where each
    door's key sentence starts (a token index); door i + 1 holds keys[i] at at_depths[i]."""
    unit = ctx.encode(FILLER)
    ids = ctx.encode("", first=True)  # BOS, when the model starts streams with it
    needles = [ctx.encode(key_text(i + 1, key)) for i, key in enumerate(keys)]
    room = length - len(ids) - sum(map(len, needles)) - len(ctx.encode(question_text(len(keys))))
    units = max(room // len(unit), len(keys))
    at, placed = [], 0
    for needle, depth in zip(needles, at_depths, strict=True):
        before = round(units * depth) - placed
        ids += unit * before
        placed += before
        at.append(len(ids))
        ids += needle
    return ids + unit * (units - placed), at


def methods_for(ctx: Context, length: int) -> list[tuple[str, StreamConfig]]:
    """The methods run at ``length`` (``ctx.methods``, or all): dense only within the model's trained context."""
    window, memory = (252, MemoryConfig(block_size=64)) if ctx.quick else (CACHE.window, MemoryConfig())
    memory = ctx.memory_or(replace(memory, select="content"))
    out = [
        ("sink", StreamConfig(num_sinks=4, window=window)),
        ("memory", StreamConfig(num_sinks=4, window=window, memory=memory)),
        (
            "memory-attention",
            StreamConfig(num_sinks=4, window=window, memory=replace(memory, select="attention")),
        ),
    ]
    if length <= (ctx.max_positions or 0):
        out.append(("dense", StreamConfig(method="dense")))
    return [(name, config) for name, config in out if name in (ctx.methods or METHODS)]


def ask(ctx: Context, stream: Stream, door: int) -> str:
    """Ask for door ``door``'s key; the greedy answer. The question's last token selects what is recalled."""
    logits = stream.feed(ctx.encode(question_text(door)), recall=True)
    answer = []
    for _ in range(ANSWER_TOKENS):
        token = int(logits.argmax())
        answer.append(token)
        logits = stream.feed([token])
    return ctx.tokenizer.decode(answer)


def run_stream(ctx: Context, config: StreamConfig, length: int, keys: list[str], at_depths: list[float]):
    """One stream holding every key, each asked from the same state -> (answers, the blocks each memory layer
    recalled for the middle door's question or None, where each key sentence starts)."""
    ids, at = stream_ids(ctx, length, keys, at_depths)
    stream = Stream(ctx.model, config)
    with ctx.progress(len(ids), f"passkey {length}") as bar:
        for s in range(0, len(ids), FEED):
            stream.feed(ids[s : s + FEED])
            bar.update(min(FEED, len(ids) - s))
    saved = stream.snapshot()
    answers, recalled = [], None
    middle = len(keys) // 2 + 1
    for door in range(1, len(keys) + 1):
        answers.append(ask(ctx, stream, door))
        if stream.memory is not None and door == middle:
            layers = {i: list(m.selected) for i, m in stream.memory.layers.items()}
            recalled = {"blocks": stream.memory.blocks, "layers": layers}
        stream.rewind(saved)
    return answers, recalled, at


def passkey(ctx: Context) -> Report:
    lengths = ctx.lengths or ((1024,) if ctx.quick else LENGTHS)
    n = ctx.keys or (3 if ctx.quick else KEYS)
    rng = random.Random(1234)
    rows, probe = [], None
    for length in lengths:
        keys = [f"{rng.randrange(10_000, 100_000)}" for _ in range(n)]
        at_depths = depths(n, length, 252 if ctx.quick else CACHE.window)
        for method, config in methods_for(ctx, length):
            answers, recalled, at = run_stream(ctx, config, length, keys, at_depths)
            for door, (key, answer, depth) in enumerate(zip(keys, answers, at_depths, strict=True), 1):
                rows.append((length, depth, method, door, key, answer.strip(), right(answer, key)))
            if recalled is not None and method == "memory":  # the longest such stream is shown
                middle = n // 2
                needle = (at[middle] - config.num_sinks) // config.memory.block_size
                probe = dict(recalled, length=length, key=keys[middle], needle_block=needle)
    return _report(ctx, rows, probe)


def _report(ctx: Context, rows: list, probe: dict | None) -> Report:
    cells: dict[tuple, list[bool]] = defaultdict(list)
    for length, _depth, method, door, _key, _answer, ok in rows:
        cells[method, length, door].append(ok)
    levels = sorted({r[3] for r in rows})  # doors: door d's key sits at the d-th of the spread depths
    methods = list(dict.fromkeys(r[2] for r in rows))
    lengths = sorted({r[0] for r in rows})
    table_rows = []
    for method in methods:
        for length in lengths:
            accs = [cells.get((method, length, d)) for d in levels]
            table_rows.append((method, length, *[f"{sum(a)}/{len(a)}" if a else "-" for a in accs]))
    report = Report(
        "passkey",
        f"Passkey retrieval: sink, sink with memory, dense ({ctx.model_name})",
        ctx.command,
        ("length", "depth", "method", "door", "key", "answer", "right"),
        rows,
    )
    window = 252 if ctx.quick else CACHE.window
    memory = dict(methods_for(ctx, 0)).get("memory")
    total = {m: sum(ok for r in rows if r[2] == m for ok in [r[6]]) for m in methods}
    report.sections.append(
        "One stream per length and method holds every key; each question is asked from the same saved state. "
        f"Cache 4+{window}; memory: {memory.memory if memory else '-'} (memory-attention: the same with "
        f"select='attention'); dense where the length is within the model's trained context "
        f"({ctx.max_positions} tokens). Right answers per cell, by stream length and key depth; in all: "
        + ", ".join(f"{m} {total[m]}/{sum(r[2] == m for r in rows)}" for m in methods)
        + "."
    )
    report.sections.append(table(("method", "length", *[f"door {d}" for d in levels]), table_rows))
    where = {length: sorted({(r[3], r[1]) for r in rows if r[0] == length}) for length in lengths}
    report.sections.append(
        "Key depths (share of the stream before the key): "
        + "; ".join(f"{_k(n)}: " + ", ".join(f"{d:.0%}" for _, d in where[n]) for n in lengths)
        + "."
    )
    if probe:
        hit = [i for i, sel in probe["layers"].items() if probe["needle_block"] in sel]
        report.sections.append(
            f"Blocks recalled when the question was asked ({probe['length']} tokens, key {probe['key']} in block "
            f"{probe['needle_block']} of {probe['blocks']}): the key's block was recalled by {len(hit)} of "
            f"{len(probe['layers'])} layers ({', '.join(map(str, hit)) or 'none'})."
        )
    fig, axes = figure(2 if probe else 1, len(methods), (4.2 * len(methods), 3.6 * (2 if probe else 1)))
    for j, method in enumerate(methods):
        ax = axes[0, j]
        grid = [
            [
                (sum(cells[method, n, d]) / len(cells[method, n, d]))
                if cells.get((method, n, d))
                else float("nan")
                for n in lengths
            ]
            for d in levels
        ]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
        ax.set_yticks(range(len(levels)), [f"door {d}" for d in levels])
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                ax.text(x, y, "-" if v != v else f"{v:.0%}", ha="center", va="center", fontsize=9)
        ax.set_title(method)
        ax.set_xlabel("stream length (tokens)")
        if j == 0:
            ax.set_ylabel("key (deeper down)")
    if probe:
        grid_spec = axes[1, 0].get_gridspec()
        for ax in axes[1]:
            ax.remove()
        ax = fig.add_subplot(grid_spec[1, :])
        fig.subplots_adjust(hspace=0.45)
        for i, sel in probe["layers"].items():
            ax.scatter(sel, [i] * len(sel), s=12, color="C0")
        ax.axvline(probe["needle_block"], color="C3", lw=1, label="block holding the key")
        ax.set_xlim(-0.5, probe["blocks"] - 0.5)
        ax.set_xlabel("memory block")
        ax.set_ylabel("layer")
        ax.set_title(f"blocks recalled at the question ({_k(probe['length'])} tokens)")
        ax.legend(fontsize=8, loc="upper right")
    report.figure = fig
    return report


def _k(n: int) -> str:
    return f"{n // 1048576}M" if n >= 1048576 else f"{n // 1024}K"
