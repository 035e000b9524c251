"""The token loop, in one place: sampling, incremental detokenizing, stop strings and EOS (``Generation``), and
``stream_generate``, which drives it over a ``Stream``: prefill, then one token at a time.

``Generation`` never feeds the model itself, so a caller that feeds several streams' tokens in one pass (the
server's batched decoding) drives the very same loop: ``next_token`` after each feed, ``emit`` after the next.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from ..config import ConfigError, StreamConfig
from .recalls import Recall, recalled
from .stream import Stream
from .tokens import encode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sampling:
    """Sampling options. ``temperature=0`` is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")


@dataclass
class Event:
    """One step of generation: a token and the text it completes, plus the stream's vital signs."""

    token: int | None
    text: str
    cache_length: int
    tokens_seen: int
    generated: int
    tok_per_s: float
    prefill_s: float
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", or None while running
    recalls: list[Recall] | None = None  # first event only, with a memory: what the prompt's end recalled


@dataclass
class Detokenizer:
    """Incremental decoding in constant memory: only a short tail of tokens is ever re-decoded."""

    tokenizer: PreTrainedTokenizerBase
    ids: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._text(self.ids[self.prefix : self.read])
        after = self._text(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 64:  # drop what can no longer change
            cut = self.prefix
            self.ids, self.prefix, self.read = self.ids[cut:], 0, self.read - cut
        return after[len(before) :]

    def _text(self, ids: list[int]) -> str:
        # one flat list of ids decodes to one string (transformers types ``decode`` for batches as well)
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))


def sample(
    logits: torch.Tensor, sampling: Sampling, recent: Sequence[int], generator: torch.Generator | None
) -> int:
    """Pick the next token from logits (V,)."""
    logits = logits.float().clone()
    if sampling.repetition_penalty != 1.0 and recent:
        idx = torch.tensor(sorted(set(recent)))
        picked = logits[idx]
        logits[idx] = torch.where(
            picked > 0, picked / sampling.repetition_penalty, picked * sampling.repetition_penalty
        )
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest set reaching top_p
        cut = torch.cumsum(sorted_p, dim=-1) - sorted_p > sampling.top_p
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class Generation:
    """One reply's token loop, fed by its caller.

    ``next_token(logits)`` picks the token to feed; once the caller has fed it, ``emit(token, stream)`` returns its
    ``Event`` (with the text it completes, held back while a stop string may be starting, and ``finish_reason``
    once the reply is over)."""

    def __init__(self, model, tokenizer, prompt_ids: Sequence[int], sampling: Sampling):
        self.sampling, self.tokenizer = sampling, tokenizer
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.eos = set() if sampling.ignore_eos else eos_ids(model, tokenizer)
        self.detok = Detokenizer(tokenizer)
        # text held back while a stop may start
        self.hold = max((len(s) for s in sampling.stop), default=1) - 1
        self.pending = ""
        self.recent: list[int] = list(prompt_ids[-64:])
        self.generated = 0
        self.prefill_s = 0.0
        self.recalls: list[Recall] | None = None
        self.started = time.perf_counter()

    def prefilled(self, stream: Stream) -> None:
        """The prompt is in: from here on time counts as decoding. What the prompt's last token recalled is taken
        now, since a selection later in a long reply may replace it."""
        self.prefill_s = time.perf_counter() - self.started
        self.recalls = recalled(stream, self.tokenizer)
        self.started = time.perf_counter()

    def next_token(self, logits: torch.Tensor) -> int:
        token = sample(logits, self.sampling, self.recent, self.generator)
        self.recent = (self.recent + [token])[-64:]
        return token

    def emit(self, token: int, stream: Stream) -> Event:
        self.generated += 1
        n = self.generated
        finish = "stop" if token in self.eos else ("length" if n == self.sampling.max_new_tokens else None)
        self.pending += "" if token in self.eos else self.detok.push(token)
        hit = min((i for i in (self.pending.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.pending, finish = self.pending[:hit], "stop"
        cut = len(self.pending) if finish else max(0, len(self.pending) - self.hold)
        text, self.pending = self.pending[:cut], self.pending[cut:]
        elapsed = time.perf_counter() - self.started
        rate = n / elapsed if elapsed else 0.0
        recalls = self.recalls if n == 1 else None
        return Event(
            token, text, stream.cache_length, stream.tokens_seen, n, rate, self.prefill_s, finish, recalls
        )


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    sampling: Sampling | None = None,
    config: StreamConfig | None = None,
    stream: Stream | None = None,
    bos: bool = True,
) -> Iterator[Event]:
    """Feed ``prompt`` (text or token ids) into a stream and generate from it, one ``Event`` per token.

    Pass ``stream`` to continue an existing conversation; otherwise a new one is made from ``config``. Every
    generated token is fed back into the stream, so the stream ends up holding the whole exchange. Text that
    starts a stream starts with BOS when the tokenizer adds one (``bos=False``: never); token ids are fed as given.
    """
    sampling = sampling or Sampling()
    stream = stream or Stream(model, config)
    first = stream.tokens_seen == 0
    ids = encode(tokenizer, prompt, first, bos) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    loop = Generation(model, tokenizer, ids, sampling)
    logits = stream.feed(ids, recall=True)  # with a memory, the prompt's last token selects what is recalled
    loop.prefilled(stream)
    while True:
        token = loop.next_token(logits)
        logits = stream.feed([token])
        event = loop.emit(token, stream)
        yield event
        if event.finish_reason:
            return


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a reply: the model's, its generation config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
