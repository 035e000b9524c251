"""A tokenizer's chat template, rendered for new turns only, never for the whole history.

What the template writes around messages is found once, by rendering a probe conversation of one exchange: the
text of a new turn is then what the template adds after that exchange, and what it writes after an assistant
message closes the previous reply. The terminal chat and the server both render through this.
"""

from __future__ import annotations

# A one-exchange conversation whose contents cannot occur in real text.
PROBE = [{"role": "user", "content": "\x00u"}, {"role": "assistant", "content": "\x00a"}]


class ChatTemplate:
    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.probe = self.render(PROBE, False)  # the probe conversation, rendered
        self.after_reply = self.probe[self.probe.index("\x00a") + 2 :]  # e.g. "<|im_end|>\n"

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def continuation(self, messages: list[dict], close: str) -> str:
        """The text that appends ``messages`` (and the prompt for the next reply) to a conversation whose last
        reply still lacks ``close``. Raises ``ValueError`` for a template that cannot append."""
        rendered = self.render(PROBE + messages, True)
        if not rendered.startswith(self.probe):
            raise ValueError("the chat template cannot append these messages to a conversation")
        return close + rendered[len(self.probe) :]

    def reply_close(self, eos_fed: str) -> str:
        """What still has to be fed to end an assistant reply, given the end-of-turn text the model produced."""
        if eos_fed and self.after_reply.startswith(eos_fed):
            return self.after_reply[len(eos_fed) :]
        return self.after_reply
