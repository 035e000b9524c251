"""An endless chat: each turn feeds only its own new tokens into one long-lived stream."""

from __future__ import annotations

from collections.abc import Iterator

from .config import StreamConfig
from .generate import Event, Sampling, stream_generate
from .stream import Stream

_PROBE = [{"role": "user", "content": "\x00u"}, {"role": "assistant", "content": "\x00a"}]


class ChatSession:
    """A conversation with constant memory. The chat template is rendered per turn, never for the whole history."""

    def __init__(
        self, model, tokenizer, config: StreamConfig | None = None, sampling: Sampling | None = None
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use `generate` instead")
        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling or Sampling(max_new_tokens=256)
        self.stream = Stream(model, config)
        self.turns = 0
        self._close = ""  # template text that ends the previous assistant turn, not yet fed
        self._probe = self._render(_PROBE, False)  # a rendered one-exchange conversation
        # What the template puts after an assistant message.
        self._after_reply = self._probe[self._probe.index("\x00a") + 2 :]

    def reset(self) -> None:
        self.stream.reset()
        self.turns, self._close = 0, ""

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def turn_text(self, user: str) -> str:
        """The text this turn adds to the stream: the previous turn's closing, the user message, the reply prompt."""
        message = {"role": "user", "content": user}
        if self.turns == 0:
            return self._render([message], True)
        return self._close + self._render(_PROBE + [message], True)[len(self._probe) :]

    def send(self, user: str) -> Iterator[Event]:
        if not user.strip():
            raise ValueError("the message is empty")
        text = self.turn_text(user)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        finish = None
        for event in stream_generate(self.model, self.tokenizer, ids, self.sampling, stream=self.stream):
            finish = event.finish_reason
            yield event
        self.turns += 1
        close, eos = self._after_reply, self.tokenizer.eos_token or ""
        self._close = close[len(eos) :] if finish == "stop" and close.startswith(eos) else close
