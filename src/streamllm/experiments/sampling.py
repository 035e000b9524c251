"""Which sampling a small chat model needs: the endless chat of ``chat`` (every turn of the question set as one
conversation under the paper's sink cache), once per sampling setting, counting the replies that degenerate
(empty, or looping on the same words) and those that run on to the length cap; then short questions with one
right answer, each in a chat of its own, so that a setting is not chosen for fewer loops at the cost of answers."""

from __future__ import annotations

import re
import time

from ..config import StreamConfig
from ..runtime.chat import CHAT_SAMPLING, SAMPLING_FIELDS, ChatSession
from ..runtime.generate import Event, Sampling
from .chat import MIN_DISTINCT, NGRAM, degenerate, load_questions
from .context import Context
from .report import Report, figure, table

FACT_TOKENS = 48
SEED = 1234  # every reply of every setting starts from this seed, so a rerun draws the same tokens

SETTINGS: dict[str, dict] = {
    "greedy": {},
    "greedy, repetition penalty 1.1": {"repetition_penalty": 1.1},
    "t 0.2, top-p 0.9": {"temperature": 0.2, "top_p": 0.9},
    "t 0.6, top-p 0.9": {"temperature": 0.6, "top_p": 0.9},
    "t 0.6, top-p 0.9, rep 1.1": {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1},
    "t 0.8, top-k 40, top-p 0.9, rep 1.1": {
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
    },
}


# Short questions with one right answer, each asked in a new chat: a setting that stops loops by drawing words at
# random must not cost the answers the model knows. A reply is right when it holds one of the accepted words.
FACTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the chemical formula of water?", ("h2o", "h₂o")),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is 2 + 2?", ("4", "four")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("At what temperature in Celsius does water freeze?", ("0", "zero")),
    ("What is the opposite of hot?", ("cold",)),
    ("Which animal is called the king of the jungle?", ("lion",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("On which continent is Egypt?", ("africa",)),
    ("What language is spoken in Brazil?", ("portuguese",)),
    ("How many continents are there?", ("seven", "7")),
    ("What do bees make?", ("honey",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("Which is the closest star to Earth?", ("sun",)),
)


def right(reply: str, accepted: tuple[str, ...]) -> bool:
    text = reply.lower()
    return any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) for word in accepted)


def _setting(options: dict, max_new: int) -> Sampling:
    return Sampling(max_new_tokens=max_new, seed=SEED, **options)


def _is_default(options: dict) -> bool:
    chosen = Sampling(**options)
    return all(getattr(chosen, f) == getattr(CHAT_SAMPLING, f) for f in SAMPLING_FIELDS)


def _reply(session: ChatSession, user: str) -> tuple[str, Event, float]:
    start, reply = time.perf_counter(), ""
    last: Event | None = None
    for event in session.send(user):
        reply, last = reply + event.text, event
    assert last is not None, "a reply ends with the event that says why it finished"
    return reply, last, round(time.perf_counter() - start, 2)


def _run(ctx: Context, name: str, options: dict, turns, facts, window: int, max_new: int) -> list[tuple]:
    """One setting: the endless chat over ``turns``, then each fact question in a chat of its own."""
    config = StreamConfig(num_sinks=4, window=window)
    rows: list[tuple] = []
    with ctx.progress(len(turns) + len(facts), name) as bar:
        session = ChatSession(ctx.model, ctx.tokenizer, config, _setting(options, max_new), bos=ctx.bos)
        for turn, (qid, user) in enumerate(turns, 1):
            reply, last, seconds = _reply(session, user)
            why = degenerate(reply) or ""
            rows.append(
                (name, "chat", turn, qid, why, last.generated, last.finish_reason, seconds, "", reply)
            )
            bar.update(1)
        for n, (question, accepted) in enumerate(facts, 1):
            alone = ChatSession(ctx.model, ctx.tokenizer, config, _setting(options, FACT_TOKENS), bos=ctx.bos)
            reply, last, seconds = _reply(alone, question)
            why = degenerate(reply) or ""
            ok = right(reply, accepted)
            rows.append((name, "facts", n, n, why, last.generated, last.finish_reason, seconds, ok, reply))
            bar.update(1)
    return rows


def sampling(ctx: Context) -> Report:
    window, max_new = (60, 16) if ctx.quick else (1020, 256)
    turns = load_questions(ctx.questions)
    facts = FACTS[:3] if ctx.quick else FACTS
    if ctx.quick:
        turns = turns[:4]
    rows = []
    for name, options in SETTINGS.items():
        rows += _run(ctx, name, options, turns, facts, window, max_new)
    summary = []
    for name, options in SETTINGS.items():
        mine = [r for r in rows if r[0] == name and r[1] == "chat"]
        answers = [r for r in rows if r[0] == name and r[1] == "facts"]
        summary.append(
            (
                name + (" (the chat default)" if _is_default(options) else ""),
                len(mine),
                sum(bool(r[4]) for r in mine),
                sum(r[4] == "repetitive" for r in mine),
                sum(r[6] == "length" for r in mine),
                round(sum(r[5] for r in mine) / len(mine), 1),
                f"{sum(r[8] for r in answers)}/{len(answers)}",
            )
        )
    header = (
        "sampling",
        "chat replies",
        "degenerate",
        "of which looping",
        "ran to the cap",
        "mean tokens",
        "facts right",
    )
    source = ctx.questions.name if ctx.questions else "bundled sample"
    report = Report(
        "sampling",
        f"Chat sampling: {len(turns)} turns ({source}) as one conversation per setting, cache 4+{window}, "
        f"at most {max_new} new tokens",
        ctx.command,
        (
            "sampling",
            "part",
            "turn",
            "question_id",
            "degenerate",
            "generated",
            "finish",
            "seconds",
            "right",
            "reply",
        ),
        rows,
    )
    report.sections.append(table(header, summary))
    report.sections.append(
        f"A reply is degenerate when empty or when under {MIN_DISTINCT:.0%} of its word {NGRAM}-grams are "
        f"distinct. Every reply is drawn with seed {SEED}. 'Ran to the cap' counts replies that ended at the "
        "token limit rather than at the model's end of turn. 'Facts right': short questions with one right answer "
        f"(in `experiments/sampling.py`), each in a new chat, at most {FACT_TOKENS} new tokens, right when the "
        "reply holds an accepted word."
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
