"""What a stream's memory recalled, in words people can read: each recalled block as a short snippet of its text
and how many tokens ago it was said (``docs/design.md``, "Memory").

The selection that shapes a reply is the one its prompt's last token makes, so the token loop takes this view
right after the prompt is fed (``Generation.prefilled``) and hands it out with the reply's first event.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SNIPPET_CHARS = 200


@dataclass(frozen=True)
class Recall:
    """One recalled block. ``text``: a snippet of it, whitespace collapsed ("" where its tokens were never
    noted, as in a memory filled with made-up keys); ``tokens_ago``: tokens fed after the block's last one, up
    to the selection; ``layers``: the share of memory layers that chose it (0..1); ``start`` .. ``end`` - 1: its
    text positions."""

    text: str
    tokens_ago: int
    layers: float
    start: int
    end: int

    def as_dict(self) -> dict:
        return asdict(self)


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters. A block's tokens decoded alone may start or end inside
    a character; the replacement characters that leaves are dropped."""
    flat = " ".join(text.replace("\ufffd", "").split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "\u2026"


def recalled(stream, tokenizer, limit: int = SNIPPET_CHARS) -> list[Recall] | None:
    """The blocks the stream's latest selection recalled, as seen from now; None when it has no memory."""
    memory = stream.memory
    if memory is None:
        return None
    seen = stream.tokens_seen
    return [
        Recall(
            text=snippet(tokenizer.decode(entry["tokens"], skip_special_tokens=True), limit),
            tokens_ago=seen - entry["end"],
            layers=entry["layers"],
            start=entry["start"],
            end=entry["end"],
        )
        for entry in memory.recalls()
    ]
