"""Passkey retrieval: a 5-digit key hidden at a depth in a long stream of filler text, asked for at the end.

    ... The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
    The pass key is 40317. Remember it. 40317 is the pass key.
    ... (more filler) ...
    What is the pass key? The pass key is

The model answers greedily; a trial is right when the key's digits come first in its answer. Each cell (length,
depth, method) runs ``keys`` different keys, each in its own fresh stream. Methods: ``sink`` (the paper), ``memory``
(sink with memory of evicted blocks, ``--memory`` defaults) and ``dense`` where the model was trained on that
length. Besides the heat maps, one run (the longest memory trial at 50% depth) records, per layer, the blocks
recalled when the question was asked and whether the block holding the key was among them.
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
QUESTION = "What is the pass key? The pass key is"
LENGTHS = (4096, 16384, 65536, 262144, 1048576)
DEPTHS = (0.1, 0.5, 0.9)
KEYS = 10
METHODS = (
    "sink",
    "memory",
    "memory-fixed",
    "dense",
)  # memory-fixed: recalled tokens at InfLLM's fixed distance
ANSWER_TOKENS = 8
CACHE = StreamConfig(num_sinks=4, window=1020)  # --quick: 4+252, memory blocks of 64


def key_text(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def right(answer: str, key: str) -> bool:
    """Whether the first number in the answer is the key."""
    found = re.search(r"\d+", answer)
    return bool(found) and found.group(0) == key


def trial_ids(ctx: Context, length: int, depth: float, key: str) -> tuple[list[int], list[int], int]:
    """The stream before the question, the question, and where the key sentence starts (a token index)."""
    unit = ctx.encode(FILLER)
    start = ctx.encode("", first=True)  # BOS, when the model starts streams with it
    needle = ctx.encode(key_text(key))
    question = ctx.encode(QUESTION)
    room = length - len(start) - len(needle) - len(question)
    units = max(room // len(unit), 1)
    before = round(units * depth)
    ids = start + unit * before
    at = len(ids)
    ids += needle + unit * (units - before)
    return ids, question, at


def methods_for(ctx: Context, length: int) -> list[tuple[str, StreamConfig]]:
    """The methods run at ``length`` (``ctx.methods``, or all): dense only within the model's trained context."""
    window, memory = (252, MemoryConfig(block_size=64)) if ctx.quick else (CACHE.window, MemoryConfig())
    memory = ctx.memory_or(memory)
    out = [
        ("sink", StreamConfig(num_sinks=4, window=window)),
        ("memory", StreamConfig(num_sinks=4, window=window, memory=memory)),
        ("memory-fixed", StreamConfig(num_sinks=4, window=window, memory=replace(memory, positions="fixed"))),
    ]
    if length <= (ctx.max_positions or 0):
        out.append(("dense", StreamConfig(method="dense")))
    return [(name, config) for name, config in out if name in (ctx.methods or METHODS)]


def run_trial(ctx: Context, config: StreamConfig, length: int, depth: float, key: str):
    """One stream -> (the greedy answer, the blocks each memory layer recalled for the question or None, where
    the key sentence starts)."""
    ids, question, at = trial_ids(ctx, length, depth, key)
    stream = Stream(ctx.model, config)
    with ctx.progress(len(ids), f"passkey {length} {depth:.0%}") as bar:
        step = 4096
        for s in range(0, len(ids), step):
            stream.feed(ids[s : s + step])
            bar.update(min(step, len(ids) - s))
    logits = stream.feed(question, recall=True)  # the question's last token selects what is recalled
    recalled = None
    if stream.memory is not None:
        recalled = {i: list(m.selected) for i, m in stream.memory.layers.items()}
        recalled = {"blocks": stream.memory.blocks, "layers": recalled}
    answer = []
    for _ in range(ANSWER_TOKENS):
        token = int(logits.argmax())
        answer.append(token)
        logits = stream.feed([token])
    return ctx.tokenizer.decode(answer), recalled, at


def passkey(ctx: Context) -> Report:
    lengths = ctx.lengths or ((1024,) if ctx.quick else LENGTHS)
    keys = ctx.keys or (1 if ctx.quick else KEYS)
    rng = random.Random(1234)
    rows, probe = [], None
    for length in lengths:
        for depth in DEPTHS:
            cell_keys = [f"{rng.randrange(10_000, 100_000)}" for _ in range(keys)]
            for method, config in methods_for(ctx, length):
                for key in cell_keys:
                    answer, recalled, at = run_trial(ctx, config, length, depth, key)
                    rows.append((length, depth, method, key, answer.strip(), right(answer, key)))
                    if recalled is not None and depth == 0.5:  # the longest such run is shown
                        needle = (at - config.num_sinks) // config.memory.block_size  # where the key starts
                        probe = dict(recalled, length=length, key=key, needle_block=needle)
    return _report(ctx, rows, probe)


def _report(ctx: Context, rows: list, probe: dict | None) -> Report:
    cells: dict[tuple, list[bool]] = defaultdict(list)
    for length, depth, method, _key, _answer, ok in rows:
        cells[method, length, depth].append(ok)
    methods = list(dict.fromkeys(r[2] for r in rows))
    lengths = sorted({r[0] for r in rows})
    table_rows = []
    for method in methods:
        for length in lengths:
            accs = [cells.get((method, length, d)) for d in DEPTHS]
            table_rows.append((method, length, *[f"{sum(a)}/{len(a)}" if a else "-" for a in accs]))
    report = Report(
        "passkey",
        f"Passkey retrieval: sink, sink with memory, dense ({ctx.model_name})",
        ctx.command,
        ("length", "depth", "method", "key", "answer", "right"),
        rows,
    )
    window, memory = (252, MemoryConfig(block_size=64)) if ctx.quick else (CACHE.window, MemoryConfig())
    memory = ctx.memory_or(memory)
    report.sections.append(
        "Right answers per cell (keys right / keys tried), by stream length in tokens and the depth of the key. "
        f"Cache 4+{window}; memory: {memory} (memory-fixed: the same with positions='fixed'); dense where the "
        f"length is within the model's trained context ({ctx.max_positions} tokens)."
    )
    report.sections.append(table(("method", "length", *[f"depth {d:.0%}" for d in DEPTHS]), table_rows))
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
            for d in DEPTHS
        ]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
        ax.set_yticks(range(len(DEPTHS)), [f"{d:.0%}" for d in DEPTHS])
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                ax.text(x, y, "-" if v != v else f"{v:.0%}", ha="center", va="center", fontsize=9)
        ax.set_title(method)
        ax.set_xlabel("stream length (tokens)")
        if j == 0:
            ax.set_ylabel("key depth")
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
