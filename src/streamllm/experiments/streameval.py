"""StreamEval (paper Sec. 4.3, whose code was never released), implemented here: a stream of numbered register
lines with a query every 10 lines asking for the content of an earlier line, scored by exact match.

    line 17: REGISTER_CONTENT is <40317>
    ...
    Q: What is the REGISTER_CONTENT in line 17? A: line 17: REGISTER_CONTENT is <40317>

The model's answers stay in the stream, as in a chat. Accuracy is reported against the distance (in tokens)
from the query back to the line it asks about, for several cache sizes: once that line has left the cache the
model cannot know it, and accuracy must fall to zero. With ``memory`` (``--methods sink,memory``) the evicted lines
are kept in blocks and the query's last token recalls the blocks that match it, so accuracy can stay up past the
window: that is what memory is for.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..config import MemoryConfig, StreamConfig
from ..runtime.generate import Sampling, stream_generate
from ..runtime.stream import Stream
from .context import Context
from .report import Report, figure, table

if TYPE_CHECKING:
    from ..core.memory import Memory

QUERY_EVERY = 10  # lines
# memory: blocks chosen by attention; -content / -hybrid: by the question's tokens (alone, or proposing blocks
# for attention to choose from); -fixed: recalled tokens at InfLLM's fixed distance; -oracle: the blocks
# holding the answer forced in (the ceiling of any selection); dense: no eviction (the model's own ceiling)
METHODS = ("sink", "dense", "memory", "memory-content", "memory-hybrid", "memory-fixed", "memory-oracle")
SELECT = {"memory-content": "content", "memory-hybrid": "hybrid", "memory-oracle": "content"}


def method_config(ctx: Context, method: str, window: int) -> StreamConfig:
    """The cache ``method`` names, with ``window``; --quick uses memory blocks of 16 tokens (about a line)."""
    if method not in METHODS:
        raise ValueError(f"streameval runs {', '.join(METHODS)}; not {method!r}")
    if method == "dense":
        return StreamConfig(method="dense", num_sinks=4, window=window)
    memory = ctx.memory_or(MemoryConfig(block_size=16) if ctx.quick else MemoryConfig())
    if method == "memory-fixed":
        memory = replace(memory, positions="fixed")
    if method in SELECT:
        memory = replace(memory, select=SELECT[method])
    return StreamConfig(num_sinks=4, window=window, memory=None if method == "sink" else memory)


def line_text(index: int, value: str) -> str:
    return f"line {index}: REGISTER_CONTENT is <{value}>\n"


def query_text(index: int) -> str:
    # The answer restates the asked line word for word, so the retrieval the test measures is a copy of what
    # follows an exact earlier prefix (small models manage that; they fail at paraphrased recall).
    return f"Q: What is the REGISTER_CONTENT in line {index}? A: {line_text(index, '')[:-2]}"


def score(answer: str, expected: str) -> bool:
    """Exact match: the digits the model wrote before its closing ``>`` (or the end) are the expected ones."""
    match = re.match(r"\s*(\d+)\s*(>|$)", answer)
    return match is not None and match.group(1) == expected


@dataclass
class Query:
    method: str
    cache: int  # cache size of the run
    lines_back: int
    distance: int  # tokens from the start of the asked line to the query
    in_cache: bool  # whether the whole asked line was still in the window when the query began
    answer: str
    expected: str
    # with memory: the share of memory layers whose selection at the question held the asked line's value
    # (None without memory, or when a selection after the question replaced it before it could be read)
    recalled: float | None = None

    @property
    def correct(self) -> bool:
        return score(self.answer, self.expected)


def run_stream(
    ctx: Context,
    config: StreamConfig,
    queries: int,
    lines_back: list[int],
    seed: int = 0,
    method: str = "sink",
) -> list[Query]:
    """One stream of register lines with ``queries`` queries, cycling through the ``lines_back`` distances. The
    lines and queries depend only on ``seed``, so every method is asked the same questions."""
    rng = random.Random(seed)
    stream = Stream(ctx.model, config)
    values: list[str] = []
    starts: list[int] = []  # token index where each line begins
    results: list[Query] = []
    first_query = max(lines_back)  # every query has its line to ask about
    sampling = Sampling(max_new_tokens=8, stop=(">",))
    with ctx.progress(queries, f"streameval {method} {config.num_sinks}+{config.window}") as bar:
        while len(results) < queries:
            line = len(values) + 1
            values.append(f"{rng.randrange(10_000, 100_000)}")
            starts.append(stream.tokens_seen)
            stream.feed(ctx.encode(line_text(line, values[-1]), first=stream.tokens_seen == 0))
            if line < first_query or line % QUERY_EVERY:
                continue
            back = lines_back[len(results) % len(lines_back)]
            asked = line - back + 1  # lines_back=1 asks about the line just fed
            distance = stream.tokens_seen - starts[asked - 1]
            prompt = ctx.encode(query_text(asked))
            prompt_at = stream.tokens_seen  # where the asked line ends when it is the last one fed
            value_at = starts[asked - 1] + len(
                ctx.encode(line_text(asked, "")[:-2])
            )  # the value's first token
            memory = stream.memory
            before = memory.selections if memory is not None else 0
            line_end = starts[asked] if asked < len(starts) else prompt_at
            if method == "memory-oracle":
                assert memory is not None, "memory-oracle runs with memory"
                memory.force(answer_blocks(config, value_at, line_end))
            pieces: list[str] = []
            recalled: float | None = None
            for event in stream_generate(ctx.model, ctx.tokenizer, prompt, sampling, stream=stream):
                if not pieces and memory is not None and memory.selections - before == len(memory.layers):
                    recalled = value_recalled(memory, config, value_at, line_end)
                pieces.append(event.text)
            if method == "memory-oracle":
                assert memory is not None
                memory.force([])
            answer = "".join(pieces)
            stream.feed(ctx.encode(">\n" if not answer.endswith(">") else "\n"))
            results.append(
                Query(
                    method,
                    config.cache_size,
                    back,
                    distance,
                    config.method == "dense" or distance <= config.window,
                    answer,
                    values[asked - 1],
                    recalled,
                )
            )
            bar.update(1)
    return results


def answer_blocks(config: StreamConfig, start: int, end: int) -> list[int]:
    """The memory blocks holding a token of text positions ``start .. end - 1`` (an asked line's value)."""
    assert config.memory is not None, "the blocks are the memory's"
    bs = config.memory.block_size
    return sorted({(p - config.num_sinks) // bs for p in range(start, end)})


def value_recalled(memory: Memory, config: StreamConfig, start: int, end: int) -> float:
    """The share of memory layers whose current selection holds a block with a token of text positions
    ``start .. end - 1`` (an asked line's value)."""
    blocks = answer_blocks(config, start, end)
    layers = memory.layers.values()
    return sum(any(b in blocks for b in m.selected) for m in layers) / len(layers)


def streameval(ctx: Context) -> Report:
    windows: tuple[int, ...]
    if ctx.quick:
        windows, lines_back, rounds = (60,), [1, 4, 12], 2
    else:
        windows, lines_back, rounds = (252, 1020), [1, 5, 10, 20, 40, 60, 80, 100, 140], 6
    methods = ctx.methods or ["sink", "dense", "memory", "memory-content", "memory-oracle"]
    configs = [(m, method_config(ctx, m, w)) for m in methods for w in windows]  # refuses unknown ones first
    # dense only where the whole stream (about 25 tokens a line) fits the model's trained context
    longest = rounds * len(lines_back) * QUERY_EVERY * 25
    configs = [(m, c) for m, c in configs if m != "dense" or longest <= (ctx.max_positions or 0)]
    results: list[Query] = []
    for method, config in configs:
        results += run_stream(ctx, config, rounds * len(lines_back), lines_back, method=method)
    groups: dict[tuple[str, int, int], list[Query]] = defaultdict(list)
    for q in results:
        groups[q.method, q.cache, q.lines_back].append(q)
    rows = []
    for (method, cache, back), qs in sorted(
        groups.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1:])
    ):
        distance = sum(q.distance for q in qs) / len(qs)
        inside = sum(q.in_cache for q in qs)
        rows.append(
            (
                method,
                cache,
                back,
                round(distance),
                f"{inside}/{len(qs)}",
                sum(q.correct for q in qs) / len(qs),
            )
        )

    def acc(qs: list[Query]) -> str:
        return (
            f"{sum(q.correct for q in qs) / len(qs):.3f} ({sum(q.correct for q in qs)}/{len(qs)})"
            if qs
            else "-"
        )

    report = Report(
        "streameval",
        f"StreamEval: accuracy against distance to the answer ({ctx.model_name})",
        ctx.command,
        (
            "method",
            "cache",
            "lines_back",
            "distance_tokens",
            "in_cache",
            "answer",
            "expected",
            "correct",
            "recalled",
        ),
        [
            (
                q.method,
                q.cache,
                q.lines_back,
                q.distance,
                q.in_cache,
                q.answer,
                q.expected,
                q.correct,
                "" if q.recalled is None else round(q.recalled, 3),
            )
            for q in results
        ],
    )

    def recall(qs: list[Query]) -> str:
        shares = [q.recalled for q in qs if q.recalled is not None]
        if not shares:
            return "-"
        most = sum(share >= 0.5 for share in shares)
        return f"{sum(shares) / len(shares):.2f}; half the layers or more: {most}/{len(shares)}"

    report.sections.append(
        table(
            (
                "method",
                "accuracy, answer still in the cache",
                "accuracy, answer evicted",
                "evicted: share of memory layers that recalled the value",
            ),
            [
                (
                    m,
                    acc([q for q in results if q.method == m and q.in_cache]),
                    acc([q for q in results if q.method == m and not q.in_cache]),
                    recall([q for q in results if q.method == m and not q.in_cache]),
                )
                for m in methods
            ],
        )
    )
    report.sections.append(
        table(
            ("method", "cache", "lines back", "mean distance (tokens)", "answer in cache", "accuracy"), rows
        )
    )
    fig, axes = figure()
    ax = axes[0, 0]
    caches = ["-", "--", "-."]  # line style by cache, colour by method
    for i, window in enumerate(windows):
        cache = window + 4
        for j, method in enumerate(methods):
            pts = [(r[3], r[5]) for r in rows if r[0] == method and r[1] == cache]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                ls=caches[i % len(caches)],
                label=f"{method}, cache 4+{window}",
                color=f"C{j}",
            )
        ax.axvline(window, color="grey", ls=caches[i % len(caches)], lw=1)
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("distance from the query back to the asked line (tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"{ctx.model_name}: StreamEval (grey vertical: window size)")
    ax.legend()
    report.figure = fig
    return report
