"""Conversation recall: a chat in which the user tells the assistant a few facts about themselves (a name, a
number, a place, ...), then talks about other things for thousands of tokens, then asks for each fact.

    user: Please remember a few things about me. My name is Ines Okafor. The code for my locker is 4817. ...
    assistant: Of course, I will remember. Your name is Ines Okafor. The code for your locker is 4817. ...
    user: <a question of the bundled sample>      assistant: <a passage of Shakespeare, about 200 tokens>
    ... (as many such turns as the length asks for) ...
    user: What is the code for my locker?         assistant: The code for your locker is

The conversation is rendered turn by turn with the model's chat template, and the assistant's turns are fed as
given (the experiment measures recall, not what the model would have said in between). One stream per (length,
method) holds the whole conversation; its state is taken once, and each question is asked from it and taken back
(``Stream.snapshot`` / ``rewind``). The answer starts by restating the question, as small models copy a fact
reliably only when prompted with the words it followed; it is right when it contains the fact. Methods: ``sink``,
``memory`` (content selection, ``--memory-*`` options otherwise), ``memory-attention`` (blocks chosen by
attention) and ``dense`` where the conversation fits the model's trained context.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import cast

from ..config import StreamConfig
from ..runtime.stream import Stream
from ..runtime.templates import ChatTemplate
from . import passkey
from .chat import load_questions
from .context import Context
from .report import Report, figure, table

LENGTHS = (2048, 4096, 16384, 65536)
METHODS = passkey.METHODS
ANSWER_TOKENS = 12
REPLY_TOKENS = 200  # a filler turn's assistant passage
NAMES = [
    "Ines Okafor",
    "Tomasz Lindqvist",
    "Priya Castellanos",
    "Mateo Haugland",
    "Yuki Brennan",
    "Amara Novak",
]
SISTERS = ["Greta", "Folake", "Marisol", "Ingrid", "Keiko", "Dagny"]
TOWNS = ["Tarragona", "Ballyhaunis", "Kristiansund", "Oamaru", "Vlissingen", "Ravello"]
COLOURS = ["teal", "ochre", "magenta", "olive", "crimson", "lavender"]
# (what the user says, the question, how the answer starts, the values)
FACTS = [
    ("My name is {}.", "What is my name?", "Your name is", NAMES),
    ("The code for my locker is {}.", "What is the code for my locker?", "The code for your locker is", None),
    ("I grew up in a town called {}.", "What is the town I grew up in called?", "You grew up in", TOWNS),
    ("My sister is called {}.", "What is my sister called?", "Your sister is called", SISTERS),
    ("My favourite colour is {}.", "What is my favourite colour?", "Your favourite colour is", COLOURS),
]


def facts(seed: int) -> list[tuple[str, str, str, str]]:
    """(statement, question, answer start, value) for every fact, the values drawn with ``seed``."""
    rng = random.Random(seed)
    out = []
    for said, asked, start, values in FACTS:
        value = rng.choice(values) if values else f"{rng.randrange(1000, 10000)}"
        out.append((said.format(value), asked, start, value))
    return out


def conversation(ctx: Context, template: ChatTemplate, told: list, length: int) -> list[int]:
    """The conversation before the questions, as token ids: the facts, then filler turns up to ``length``."""
    intro = "Please remember a few things about me. " + " ".join(f[0] for f in told)
    # the assistant confirms each fact in the words its answer will start with, as a helpful one would
    confirm = " ".join(f"{start} {value}." for _, _, start, value in told)
    text = (
        template.render([{"role": "user", "content": intro}], True) + f"Of course, I will remember. {confirm}"
    )
    ids = ctx.encode(text, first=True)
    close = template.after_reply
    questions = [q for _, q in load_questions(ctx.questions)]
    prose = ctx.text_ids(length + REPLY_TOKENS, first_work="hamlet")
    n = 0
    while len(ids) < length:
        piece = prose[n * REPLY_TOKENS : (n + 1) * REPLY_TOKENS]
        # one list of ids decodes to one string
        passage = cast(str, ctx.tokenizer.decode(piece, skip_special_tokens=True)).strip()
        user = questions[n % len(questions)]
        ids += ctx.encode(template.continuation([{"role": "user", "content": user}], close) + passage)
        n += 1
    return ids


def question_ids(ctx: Context, template: ChatTemplate, asked: str, start: str) -> list[int]:
    return ctx.encode(
        template.continuation([{"role": "user", "content": asked}], template.after_reply) + start
    )


def methods_for(ctx: Context, length: int) -> list[tuple[str, StreamConfig]]:
    """Passkey's methods and caches; dense where the conversation and a question with its answer fit."""
    return passkey.methods_for(ctx, length + 64)


def ask_all(ctx: Context, stream: Stream, template: ChatTemplate, told: list) -> list[str]:
    """Each fact's question, asked from the same state of ``stream`` -> the greedy answers."""
    saved = stream.snapshot()
    answers = []
    for _, asked, start, _ in told:
        ids = question_ids(ctx, template, asked, start)
        logits = stream.feed(ids, recall=True, query=ctx.encode(asked))
        out = []
        for _ in range(ANSWER_TOKENS):
            token = int(logits.argmax())
            out.append(token)
            logits = stream.feed([token])
        answers.append(cast(str, ctx.tokenizer.decode(out)))
        stream.rewind(saved)
    return answers


def recall(ctx: Context) -> Report:
    lengths = ctx.lengths or ((1024,) if ctx.quick else LENGTHS)
    template = ChatTemplate(ctx.tokenizer)
    rows = []
    for i, length in enumerate(lengths):
        told = facts(seed=i)
        ids = conversation(ctx, template, told, length)
        for method, config in methods_for(ctx, length):
            stream = Stream(ctx.model, config)
            with ctx.progress(len(ids), f"recall {length} {method}") as bar:
                for s in range(0, len(ids), 4096):
                    stream.feed(ids[s : s + 4096])
                    bar.update(min(4096, len(ids) - s))
            for (said, _, _, value), answer in zip(told, ask_all(ctx, stream, template, told), strict=True):
                ok = value.lower() in answer.lower()
                rows.append((length, len(ids), method, said, value, answer.strip(), ok))
    return _report(ctx, rows, lengths)


def _report(ctx: Context, rows: list, lengths) -> Report:
    cells: dict[tuple, list[bool]] = defaultdict(list)
    for length, _, method, _, _, _, ok in rows:
        cells[method, length].append(ok)
    methods = list(dict.fromkeys(r[2] for r in rows))
    report = Report(
        "recall",
        f"Conversation recall: facts told early, asked after thousands of tokens ({ctx.model_name})",
        ctx.command,
        ("length", "tokens", "method", "fact", "expected", "answer", "right"),
        rows,
    )
    window = 252 if ctx.quick else 1020
    report.sections.append(
        f"{len(FACTS)} facts told in the first turn, then other turns up to the length, then a question per fact, "
        f"each from the same saved state. Cache 4+{window}; memory: {dict(methods_for(ctx, 0))['memory'].memory}; "
        f"dense where the conversation fits the model's {ctx.max_positions} tokens. Facts recalled:"
    )
    report.sections.append(
        table(
            ("method", *[f"{n} tokens" for n in lengths]),
            [
                (
                    m,
                    *[
                        f"{sum(cells[m, n])}/{len(cells[m, n])}" if cells.get((m, n)) else "-"
                        for n in lengths
                    ],
                )
                for m in methods
            ],
        )
    )
    fig, axes = figure()
    ax = axes[0, 0]
    for j, method in enumerate(methods):
        pts = [(n, sum(cells[method, n]) / len(cells[method, n])) for n in lengths if cells.get((method, n))]
        # methods that score the same would hide each other: each is nudged sideways and marked its own way
        nudge = 1.06 ** (j - (len(methods) - 1) / 2)
        ax.plot(
            [p[0] * nudge for p in pts],
            [p[1] for p in pts],
            marker="osD^v"[j % 5],
            ls=("-", "--", "-.", ":")[j % 4],
            color=f"C{j}",
            label=method,
        )
    ax.axvline(window + 4, color="grey", ls=":", lw=1, label="cache size")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("conversation before the questions (tokens)")
    ax.set_ylabel("facts recalled")
    ax.set_title(f"{ctx.model_name}: conversation recall, cache 4+{window}")
    ax.legend()
    report.figure = fig
    return report
