"""What an experiment is handed: the model, where to write, how big to run, and the texts to use."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import MemoryConfig
from ..data import DataError, shakespeare_text, shakespeare_works
from ..runtime.tokens import encode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Context:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    command: str  # the command line that reproduces the run
    quick: bool = False  # a reduced size, for tests
    texts: list[Path] = field(default_factory=list)  # user texts, chained; empty: the bundled Shakespeare
    tokens: int | None = None  # override of the experiment's stream length
    questions: Path | None = None  # chat experiment: MT-Bench style JSONL
    bos: bool = True  # streams start with BOS when the tokenizer adds one
    lengths: list[int] | None = None  # passkey: stream lengths instead of the default ones
    keys: int | None = None  # passkey: keys per cell instead of the default
    methods: list[str] | None = None  # passkey: the methods to run instead of all
    memory: MemoryConfig | None = (
        None  # the --memory-* options: what the memory methods use instead of defaults
    )
    bar: Callable[..., contextlib.AbstractContextManager] | None = None  # bar(total=, desc=) -> obj.update(n)

    def memory_or(self, default: MemoryConfig) -> MemoryConfig:
        """The memory the user's ``--memory-*`` options describe, else ``default`` (the experiment's own)."""
        return self.memory or default

    def progress(self, total: int, desc: str):
        if self.bar is None:
            return contextlib.nullcontext(_NoBar())
        return self.bar(total=total, desc=desc)

    @property
    def max_positions(self) -> int | None:
        """The model's pre-training context length, if its config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def encode(self, text: str, first: bool = False) -> list[int]:
        """``text`` as token ids; ``first``: it starts a stream (with BOS, when the tokenizer adds one)."""
        return encode(self.tokenizer, text, first, self.bos)

    def text_ids(self, length: int, first_work: str = "hamlet") -> list[int]:
        """``length`` tokens (or ``--tokens``) of the user's texts, else of Shakespeare starting at one work."""
        length = self.tokens or length
        ids: list[int] = []
        for text in self.text_pieces(first_work, cycle=False):
            ids.extend(self.encode(text, first=not ids))
            if len(ids) >= length:
                return ids[:length]
        raise DataError(
            f"the texts hold only {len(ids)} tokens; this experiment needs {length} (see --tokens)"
        )

    def text_pieces(self, first_work: str = "hamlet", cycle: bool = False) -> Iterator[str]:
        """The texts one after another (the user's, or every bundled work from ``first_work`` on), repeated
        end to end when ``cycle`` is set."""
        if self.texts:
            names = [str(p) for p in self.texts]
        else:
            works = shakespeare_works()
            start = works.index(first_work) if first_work in works else 0
            names = works[start:] + works[:start]
        while True:
            for name in names:
                yield (
                    Path(name).read_text(encoding="utf-8", errors="replace")
                    if self.texts
                    else shakespeare_text(name)
                )
            if not cycle:
                return


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass
