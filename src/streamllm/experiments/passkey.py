"""Passkey retrieval out to a million tokens: ten labelled keys hidden at spread depths in one long stream of
filler text, each asked for at the end.

    ... The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
    The pass key of door 3 is 40317. Remember it. 40317 is the pass key of door 3.
    ... (more filler, and the other doors' keys at their depths) ...
    What is the pass key of door 3? The pass key of door 3 is

One stream per length holds every key, so a million-token length costs one million-token stream, not ten, and
``sink``, ``memory`` and ``memory-attention`` share it: its memory keeps what leaves the window but recalls
nothing while the filler streams by (no refresh: the filler asks for nothing), so its cache is, bit for bit, a
plain sink stream's. At its end the stream's state is taken once; each question is asked three ways (no recall:
``sink``, the paper; recall chosen by content: ``memory``, the default selection; by attention alone:
``memory-attention``), answered greedily, and the stream is put back to that state (its memory drops what the
question and answer added) before the next one. ``dense`` runs its own stream where the model was trained on
that length. A trial is right when the key's digits come first in the answer. Besides the heat maps, the longest
stream records, per layer, the blocks recalled for the middle door's question and whether the block holding its
key was among them.

Streams of ``CHECKPOINT`` tokens or more save their state every ``CHECKPOINT`` tokens under
``$STREAMLLM_HOME/experiments/passkey/`` (the memory's blocks go to a file there as they are made), and a run
started again with the same model, length, keys and cache goes on from the last one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import cast

from safetensors import safe_open
from safetensors.torch import save_file

from ..config import MemoryConfig, StreamConfig
from ..home import home
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
CHECKPOINT = 65536  # streams this long save their state every this many tokens
SHARED = ("sink", "memory", "memory-attention")  # asked from one stream: the recall each question makes
NEVER = 1 << 62  # a refresh no stream reaches: the memory recalls only where a question asks it to


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
    return found is not None and found.group(0) == key


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


def streams_for(ctx: Context, length: int) -> list[tuple[StreamConfig, list[tuple[str, str | None]]]]:
    """The streams run at ``length``, each with the methods asked from it: (method, how its questions recall:
    None, or the memory's ``select``)."""
    requested = dict(methods_for(ctx, length))
    out: list[tuple[StreamConfig, list[tuple[str, str | None]]]] = []
    shared = [m for m in SHARED if m in requested]
    if shared:
        memory = requested.get("memory", requested.get("memory-attention"))
        asked = {"sink": None, "memory": "content", "memory-attention": "attention"}
        if memory is None or memory.memory is None:  # sink alone
            out.append((requested["sink"], [("sink", None)]))
        else:
            config = replace(memory, memory=replace(memory.memory, refresh=NEVER))
            if "memory" in requested:
                asked["memory"] = memory.memory.select
            out.append((config, [(m, asked[m]) for m in shared]))
    if "dense" in requested:
        out.append((requested["dense"], [("dense", None)]))
    return out


def ask(ctx: Context, stream: Stream, door: int, select: str | None) -> str:
    """Ask for door ``door``'s key; the greedy answer. With ``select``, the question's last token recalls what
    its memory chooses that way."""
    if select is not None:
        memory = stream.memory
        assert memory is not None, "a question that recalls needs a stream with memory"
        memory.config = replace(memory.config, select=select)
    logits = stream.feed(ctx.encode(question_text(door)), recall=select is not None)
    answer = []
    for _ in range(ANSWER_TOKENS):
        token = int(logits.argmax())
        answer.append(token)
        logits = stream.feed([token])
    # one list of ids decodes to one string
    return cast(str, ctx.tokenizer.decode(answer))


def run_stream(
    ctx: Context,
    config: StreamConfig,
    asks: list[tuple[str, str | None]],
    length: int,
    keys: list[str],
    at_depths: list[float],
):
    """One stream holding every key, each door asked each way of ``asks`` from the same state -> ({method:
    [(answer, the share of memory layers that recalled the block holding the key's first digit, or None)]},
    the blocks each memory layer recalled for the middle door's content question or None, where each key
    sentence starts)."""
    ids, at = stream_ids(ctx, length, keys, at_depths)
    saved = _Checkpoint(ctx, config, ids) if len(ids) >= CHECKPOINT else None
    stream = Stream(ctx.model, config, memory_file=saved.memory_file if saved else None)
    fed = saved.resume(stream) if saved else 0
    with ctx.progress(len(ids), f"passkey {length}") as bar:
        bar.update(fed)
        for s in range(fed, len(ids), FEED):
            stream.feed(ids[s : s + FEED])
            bar.update(min(FEED, len(ids) - s))
            if saved:
                saved.save(stream, min(s + FEED, len(ids)), done=s + FEED >= len(ids))
    start = stream.snapshot()
    answers: dict[str, list[tuple[str, float | None]]] = {m: [] for m, _ in asks}
    recalled = None
    middle = len(keys) // 2 + 1
    for door in range(1, len(keys) + 1):
        digit = at[door - 1] + len(ctx.encode(f"The pass key of door {door} is"))
        for method, select in asks:
            answer = ask(ctx, stream, door, select)
            share = None
            memory = stream.memory
            if select is not None:
                assert memory is not None and config.memory is not None
                needle = (digit - config.num_sinks) // config.memory.block_size
                per_layer = memory.layers.values()
                share = round(sum(needle in m.selected for m in per_layer) / len(per_layer), 3)
            answers[method].append((answer, share))
            if select == "content" and door == middle:
                assert memory is not None
                layers = {i: list(m.selected) for i, m in memory.layers.items()}
                recalled = {"blocks": memory.blocks, "layers": layers}
            stream.rewind(start)
    return answers, recalled, at


class _Checkpoint:
    """Where a long stream saves itself as it goes (``$STREAMLLM_HOME/experiments/passkey/<run>/``): the state
    (``state.safetensors``, its meta and the tokens fed so far in the file's metadata, written whole and then
    renamed into place) and the memory's blocks (``memory.bin``, appended after every feed). ``<run>`` names
    the model and length and a digest of the tokens, the configuration and the weights' dtype, so a changed run
    never resumes another's stream."""

    def __init__(self, ctx: Context, config: StreamConfig, ids: list[int]):
        dtype = str(next(ctx.model.parameters()).dtype)
        digest = hashlib.sha256(json.dumps([ids, repr(config), dtype]).encode()).hexdigest()[:12]
        self.folder = home() / "experiments" / "passkey" / f"{ctx.model_name}-{len(ids)}-{digest}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.memory_file = self.folder / "memory.bin" if config.memory is not None else None
        self.state_file = self.folder / "state.safetensors"
        self.last = 0

    def resume(self, stream: Stream) -> int:
        """Load the last state saved, if any; -> the tokens it had fed."""
        if not self.state_file.exists():
            return 0
        with safe_open(self.state_file, "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            meta = json.loads(f.metadata()["meta"])
        stream.load((tensors, meta["state"]))
        self.last = int(meta["fed"])
        return self.last

    def save(self, stream: Stream, fed: int, done: bool) -> None:
        """Append the memory's new blocks; every ``CHECKPOINT`` tokens (and when ``done``), the state too."""
        stream.persist()
        if fed - self.last < CHECKPOINT and not done:
            return
        tensors, meta = stream.state()
        part = self.state_file.with_suffix(".part")
        save_file(
            {k: t.contiguous() for k, t in tensors.items()},
            part,
            metadata={"meta": json.dumps({"state": meta, "fed": fed})},
        )
        os.replace(part, self.state_file)
        self.last = fed


def keys_for(lengths: Sequence[int], n: int) -> dict[int, list[str]]:
    """``n`` keys per length, drawn in the order of ``LENGTHS`` and then of the other lengths asked for: a length
    holds the same keys whichever lengths a run names (and a long stream resumes whichever run started it)."""
    rng = random.Random(1234)
    order = [*LENGTHS, *(length for length in lengths if length not in LENGTHS)]
    return {length: [f"{rng.randrange(10_000, 100_000)}" for _ in range(n)] for length in order}


def passkey(ctx: Context) -> Report:
    lengths = ctx.lengths or ((1024,) if ctx.quick else LENGTHS)
    n = ctx.keys or (3 if ctx.quick else KEYS)
    drawn = keys_for(lengths, n)
    rows, probe = [], None
    for length in lengths:
        keys = drawn[length]
        at_depths = depths(n, length, 252 if ctx.quick else CACHE.window)
        for config, asks in streams_for(ctx, length):
            answers, recalled, at = run_stream(ctx, config, asks, length, keys, at_depths)
            for method, _ in asks:
                for door, (key, (answer, share), depth) in enumerate(
                    zip(keys, answers[method], at_depths, strict=True), 1
                ):
                    ok = right(answer, key)
                    rows.append(
                        (length, depth, method, door, key, answer.strip(), ok, "" if share is None else share)
                    )
            if recalled is not None:  # the longest such stream is shown
                assert config.memory is not None
                middle = n // 2
                needle = (at[middle] - config.num_sinks) // config.memory.block_size
                probe = dict(recalled, length=length, key=keys[middle], needle_block=needle)
    rows.sort(key=lambda r: (r[0], METHODS.index(r[2]), r[3]))
    return _report(ctx, rows, probe)


def _report(ctx: Context, rows: list, probe: dict | None) -> Report:
    cells: dict[tuple, list[bool]] = defaultdict(list)
    for length, _depth, method, door, _key, _answer, ok, _share in rows:
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
        ("length", "depth", "method", "door", "key", "answer", "right", "key_recalled"),
        rows,
    )
    window = 252 if ctx.quick else CACHE.window
    memory = dict(methods_for(ctx, 0)).get("memory")
    total = {m: sum(ok for r in rows if r[2] == m for ok in [r[6]]) for m in methods}
    report.sections.append(
        "One stream per length holds every key; each question is asked from the same saved state, once per "
        "method: sink, memory and memory-attention share the stream (its memory recalls only at the question, "
        f"so its cache is a plain sink cache). Cache 4+{window}; memory: {memory.memory if memory else '-'} "
        "(memory-attention: the same with select='attention'); dense, its own stream, where the length is "
        "within the model's trained context "
        f"({ctx.max_positions} tokens). Right answers per cell, by stream length and key depth; in all: "
        + ", ".join(f"{m} {total[m]}/{sum(r[2] == m for r in rows)}" for m in methods)
        + "."
    )
    report.sections.append(table(("method", "length", *[f"door {d}" for d in levels]), table_rows))
    found = {m: [r for r in rows if r[2] == m and r[7] != ""] for m in methods}
    report.sections.append(
        "Selection and reading told apart (`key_recalled` in the CSV: the share of memory layers whose recall "
        "held the block with the key's first digit): "
        + "; ".join(
            f"{m}: the key's block recalled by half the layers or more for "
            f"{sum(r[7] >= 0.5 for r in found[m])}/{len(found[m])} questions, answered right for "
            f"{sum(r[6] for r in found[m] if r[7] >= 0.5)} of them"
            for m in methods
            if found[m]
        )
        + "."
    )
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
        # only the first panel names the doors: the others' labels would run into the panel before
        ax.set_yticks(range(len(levels)), [f"door {d}" for d in levels] if j == 0 else [])
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
