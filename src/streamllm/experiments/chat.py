"""An endless chat: every turn of a question set (MT-Bench by default shape: 80 questions of two turns) fed as one
conversation that never resets, under dense, window and sink. Counts the turns that crash or run out of context
and the degenerate answers, and records memory and speed per turn."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from ..config import StreamConfig
from ..data import DataError
from ..runtime.chat import ChatSession
from ..runtime.generate import Sampling
from ..sysinfo import current_rss_mb
from .context import Context
from .report import Report, figure, table

NGRAM = 4
MIN_DISTINCT = 0.5  # a reply whose distinct word 4-grams are under half of all its 4-grams is degenerate


def degenerate(reply: str) -> str | None:
    """Why a reply is degenerate: ``"empty"``, ``"repetitive"`` (mostly repeated word 4-grams), or None."""
    words = reply.split()
    if not words:
        return "empty"
    grams = [tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)]
    if len(grams) >= 4 and len(set(grams)) / len(grams) < MIN_DISTINCT:
        return "repetitive"
    return None


def load_questions(path: Path | None) -> list[tuple[int, str]]:
    """(question id, user turn) for every turn, in order. ``path=None``: the bundled sample of our own."""
    if path is None:
        text = resources.files(__package__).joinpath("sample_questions.jsonl").read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    turns = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            turns += [(int(item["question_id"]), str(t)) for t in item["turns"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path or 'sample'} line {n}: expected {{question_id, turns: [...]}} ({exc})"
            ) from exc
    if not turns:
        raise DataError(f"{path} holds no questions")
    return turns


def run_method(
    ctx: Context, method: str, window: int, turns: list[tuple[int, str]], max_new: int
) -> list[tuple]:
    config = StreamConfig(num_sinks=4, window=window, method=method)
    session = ChatSession(ctx.model, ctx.tokenizer, config, Sampling(max_new_tokens=max_new), bos=ctx.bos)
    limit = ctx.max_positions if method == "dense" else None
    rows = []
    with ctx.progress(len(turns), f"chat {method}") as bar:
        for turn, (qid, user) in enumerate(turns, 1):
            start = time.perf_counter()
            status, reply, generated, tok_s = "ok", "", 0, 0.0
            new_tokens = len(ctx.encode(session.turn_text(user)))
            if limit and session.stream.tokens_seen + new_tokens + max_new > limit:
                status = "out of context"  # past the pre-training length: a server would refuse the turn
            else:
                try:
                    for event in session.send(user):
                        reply += event.text
                        generated, tok_s = event.generated, event.tok_per_s
                except (RuntimeError, ValueError, MemoryError) as exc:
                    status = f"crash: {type(exc).__name__}"
            why = degenerate(reply) if status == "ok" else None
            rows.append(
                (
                    method,
                    turn,
                    qid,
                    status,
                    why or "",
                    generated,
                    round(tok_s, 2),
                    round(current_rss_mb(), 1),
                    session.stream.cache_length,
                    session.stream.tokens_seen,
                    round(time.perf_counter() - start, 2),
                    reply,
                )
            )
            bar.update(1)
    return rows


def chat(ctx: Context) -> Report:
    window, max_new = (60, 12) if ctx.quick else (1020, 48)
    turns = load_questions(ctx.questions)
    if ctx.quick:
        turns = turns[:6]
    rows = []
    for method in ("dense", "window", "sink"):
        rows += run_method(ctx, method, window, turns, max_new)
    summary = []
    for method in ("dense", "window", "sink"):
        mine = [r for r in rows if r[0] == method]
        ok = [r for r in mine if r[3] == "ok"]
        summary.append(
            (
                method,
                len(ok),
                sum(r[3].startswith("crash") for r in mine),
                sum(r[3] == "out of context" for r in mine),
                sum(bool(r[4]) for r in mine),
                sum(r[4] == "empty" for r in mine),
                round(sum(r[6] for r in ok) / len(ok), 1) if ok else "-",
                f"{mine[0][7]:.0f} -> {mine[-1][7]:.0f}",
                mine[-1][9],
            )
        )
    header = (
        "method",
        "turns answered",
        "crashed",
        "out of context",
        "degenerate",
        "of which empty",
        "mean tok/s",
        "RSS MB first -> last",
        "tokens streamed",
    )
    source = ctx.questions.name if ctx.questions else "bundled sample"
    report = Report(
        "chat",
        f"Endless chat: {len(turns)} turns ({source}) as one conversation, cache 4+{window}, {max_new} new tokens",
        ctx.command,
        (
            "method",
            "turn",
            "question_id",
            "status",
            "degenerate",
            "generated",
            "tok_per_s",
            "rss_mb",
            "cache_length",
            "tokens_streamed",
            "seconds",
            "reply",
        ),
        rows,
    )
    report.sections.append(table(header, summary))
    report.sections.append(
        f"Greedy decoding. A reply is degenerate when empty or when under {MIN_DISTINCT:.0%} of its word "
        f"{NGRAM}-grams are distinct. Dense turns that would pass the model's {ctx.max_positions}-token "
        "pre-training length are counted as out of context and not run."
    )
    fig, axes = figure(1, 2, size=(12, 4))
    for method in ("dense", "window", "sink"):
        ok = [r for r in rows if r[0] == method and r[3] == "ok"]
        axes[0, 0].plot([r[1] for r in ok], [r[7] for r in ok], label=method)
        axes[0, 1].plot([r[1] for r in ok], [r[6] for r in ok], label=method)
    axes[0, 0].set_ylabel("process RSS (MB)")
    axes[0, 1].set_ylabel("decode tokens/s")
    for ax in axes[0]:
        ax.set_xlabel("turn")
        ax.legend()
    fig.suptitle(f"{ctx.model_name}: one endless chat, {len(turns)} turns")
    report.figure = fig
    return report
