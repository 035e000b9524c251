"""An endless chat: each turn feeds only its own new tokens into one long-lived stream."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from ..config import StreamConfig
from .generate import Event, Sampling, stream_generate
from .recalls import Recall
from .stream import Stream
from .templates import ChatTemplate
from .tokens import encode

# Chosen by measurement (``streamllm experiment sampling``, docs/results.md): plain greedy decoding made 28 of 80
# chat replies of the bundled 135M model loop on the same words; a repetition penalty of 1.1 brought that to 2 and
# kept 18 of 24 short factual answers right (greedy: 19). Sampling at temperature 0.6 stopped every loop but lost
# a third of those answers.
CHAT_SAMPLING = Sampling(repetition_penalty=1.1, max_new_tokens=512)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")  # what shapes the choice of tokens


def chat_sampling(model) -> Sampling:
    """The sampling a chat starts from: the model's own generation defaults when it ships sampling ones (its
    ``generation_config`` says ``do_sample``), else ``CHAT_SAMPLING``."""
    own = getattr(model, "generation_config", None)
    if own is None or not getattr(own, "do_sample", False):
        return CHAT_SAMPLING
    found = {f: getattr(own, f) for f in SAMPLING_FIELDS if getattr(own, f, None) is not None}
    return replace(Sampling(max_new_tokens=CHAT_SAMPLING.max_new_tokens), **found)


class ChatSession:
    """A conversation with constant memory. The chat template is rendered per turn, never for the whole history."""

    def __init__(
        self,
        model,
        tokenizer,
        config: StreamConfig | None = None,
        sampling: Sampling | None = None,
        bos: bool = True,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use `generate` instead")
        self.model, self.tokenizer, self.bos = model, tokenizer, bos
        self.template = ChatTemplate(tokenizer)
        self.sampling = sampling or Sampling(max_new_tokens=256)
        self.stream = Stream(model, config)
        self.turns = 0
        self._close = ""  # template text that ends the previous assistant turn, not yet fed
        self.last_recalls: list[Recall] | None = None  # what the last reply's prompt recalled (with a memory)

    def reset(self) -> None:
        self.stream.reset()
        self.turns, self._close, self.last_recalls = 0, "", None

    def turn_text(self, user: str) -> str:
        """The text this turn adds to the stream: the previous turn's closing, the user message, the reply prompt."""
        message = {"role": "user", "content": user}
        if self.turns == 0:
            return self.template.render([message], True)
        return self.template.continuation([message], self._close)

    def send(self, user: str) -> Iterator[Event]:
        """Feed one user turn and stream the reply. Closing the iterator early (a user who stops the reply) keeps
        the turn as far as it went, as a stop string does."""
        if not user.strip():
            raise ValueError("the message is empty")
        text = self.turn_text(user)
        ids = encode(self.tokenizer, text, first=self.stream.tokens_seen == 0, bos=self.bos)
        finish = None
        try:
            for event in stream_generate(self.model, self.tokenizer, ids, self.sampling, stream=self.stream):
                finish = event.finish_reason
                if event.recalls is not None:
                    self.last_recalls = event.recalls
                yield event
        except GeneratorExit:
            self._end_turn(None)  # every token yielded so far is in the stream
            raise
        self._end_turn(finish)

    def _end_turn(self, finish: str | None) -> None:
        self.turns += 1
        eos_fed = (self.tokenizer.eos_token or "") if finish == "stop" else ""
        self._close = self.template.reply_close(eos_fed)
