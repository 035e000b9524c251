"""Which sampling a small chat model needs: the endless chat of ``chat`` (every turn of the question set as one
conversation under the paper's sink cache), once per sampling setting, counting the replies that degenerate
(empty, or looping on the same words) and those that run on to the length cap."""

from __future__ import annotations

import time

from ..config import StreamConfig
from ..runtime.chat import CHAT_SAMPLING, ChatSession
from ..runtime.generate import Sampling
from .chat import MIN_DISTINCT, NGRAM, degenerate, load_questions
from .context import Context
from .report import Report, figure, table

SEED = 1234  # every reply of every setting starts from this seed, so a rerun draws the same tokens

SETTINGS: dict[str, dict] = {
    "greedy": {},
    "greedy, repetition penalty 1.1": {"repetition_penalty": 1.1},
    "t 0.2, top-p 0.9": {"temperature": 0.2, "top_p": 0.9},
    "t 0.6, top-p 0.9, rep 1.1": {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1},
    "t 0.8, top-k 40, top-p 0.9, rep 1.1": {
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
    },
}


def _setting(options: dict, max_new: int) -> Sampling:
    return Sampling(max_new_tokens=max_new, seed=SEED, **options)


def _is_default(options: dict) -> bool:
    fields = ("temperature", "top_p", "top_k", "repetition_penalty")
    chosen = Sampling(**options)
    return all(getattr(chosen, f) == getattr(CHAT_SAMPLING, f) for f in fields)


def sampling(ctx: Context) -> Report:
    window, max_new = (60, 16) if ctx.quick else (1020, 256)
    turns = load_questions(ctx.questions)
    if ctx.quick:
        turns = turns[:4]
    rows = []
    for name, options in SETTINGS.items():
        config = StreamConfig(num_sinks=4, window=window)
        session = ChatSession(ctx.model, ctx.tokenizer, config, _setting(options, max_new))
        with ctx.progress(len(turns), name) as bar:
            for turn, (qid, user) in enumerate(turns, 1):
                start, reply, last = time.perf_counter(), "", None
                for event in session.send(user):
                    reply, last = reply + event.text, event
                why = degenerate(reply) or ""
                seconds = round(time.perf_counter() - start, 2)
                rows.append((name, turn, qid, why, last.generated, last.finish_reason, seconds, reply))
                bar.update(1)
    summary = []
    for name, options in SETTINGS.items():
        mine = [r for r in rows if r[0] == name]
        summary.append(
            (
                name + (" (the chat default)" if _is_default(options) else ""),
                len(mine),
                sum(bool(r[3]) for r in mine),
                sum(r[3] == "repetitive" for r in mine),
                sum(r[5] == "length" for r in mine),
                round(sum(r[4] for r in mine) / len(mine), 1),
            )
        )
    header = ("sampling", "replies", "degenerate", "of which looping", "ran to the cap", "mean tokens")
    source = ctx.questions.name if ctx.questions else "bundled sample"
    report = Report(
        "sampling",
        f"Chat sampling: {len(turns)} turns ({source}) as one conversation per setting, cache 4+{window}, "
        f"at most {max_new} new tokens",
        ctx.command,
        ("sampling", "turn", "question_id", "degenerate", "generated", "finish", "seconds", "reply"),
        rows,
    )
    report.sections.append(table(header, summary))
    report.sections.append(
        f"A reply is degenerate when empty or when under {MIN_DISTINCT:.0%} of its word {NGRAM}-grams are "
        f"distinct. Every reply is drawn with seed {SEED}. 'Ran to the cap' counts replies that ended at the "
        "token limit rather than at the model's end of turn."
    )
    fig, axes = figure(1, 1, size=(9, 4))
    ax = axes[0, 0]
    names = list(SETTINGS)
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], [row[2] for row in summary], height=0.4, label="degenerate")
    ax.barh([i + 0.2 for i in y], [row[4] for row in summary], height=0.4, label="ran to the cap")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"replies out of {len(turns)}")
    ax.legend()
    fig.suptitle(f"{ctx.model_name}: replies that degenerate, by sampling")
    fig.tight_layout()
    report.figure = fig
    return report
