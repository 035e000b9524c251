"""Turning requests into text and tokens: the chat template, rendered for a whole history or for new turns only.

A session is matched by text, not tokens: its ``text`` is the rendered conversation that its cache has seen, so
a resent history extends it exactly when the history's rendering starts with it. Only the rest is tokenized and
fed. What the model generated is kept as the tokens it generated (a re-tokenization of the reply text could
differ), which is why the comparison is on text.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

from ..runtime.templates import ChatTemplate
from ..runtime.tokens import encode
from .errors import bad_request
from .schemas import ChatMessage


class Renderer:
    """The request side's own tokenizer (the model worker decodes with another copy), behind a lock: a fast
    tokenizer must not be used from two threads at once."""

    def __init__(self, tokenizer, bos: bool = True):
        self.tokenizer, self.bos = copy.deepcopy(tokenizer), bos
        self._lock = threading.Lock()
        self.template = ChatTemplate(self.tokenizer) if getattr(tokenizer, "chat_template", None) else None
        self.vocab_size = len(self.tokenizer)

    def _checked(self, render):
        """Run ``render(template)`` under the lock; a template that refuses the input is the input's fault."""
        if self.template is None:
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        try:
            with self._lock:
                return render(self.template)
        except Exception as exc:
            # a template's own checks (raise_exception), jinja errors, or no way to append
            raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The whole conversation, ending with the prompt for the assistant's reply."""
        return self._checked(lambda t: t.render(_plain(messages), True))

    def chat_continuation(self, messages: Sequence[ChatMessage], close: str) -> str:
        """The text that appends ``messages`` to a conversation whose last reply still lacks ``close``."""
        return self._checked(lambda t: t.continuation(_plain(messages), close))

    def reply_close(self, eos_fed: str) -> str:
        """What still has to be fed to end an assistant reply, given the end-of-turn text the model produced."""
        return self.template.reply_close(eos_fed) if self.template is not None else ""

    def encode(self, text: str, first: bool = False) -> list[int]:
        """``text`` as token ids; ``first``: it starts a session (with BOS, when ``bos`` and the tokenizer adds one)."""
        with self._lock:
            return encode(self.tokenizer, text, first, self.bos)

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def check_ids(self, ids: Sequence[int], param: str) -> None:
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param)


def _plain(messages: Sequence[ChatMessage]) -> list[dict]:
    return [{"role": m.template_role(), "content": m.text()} for m in messages]
