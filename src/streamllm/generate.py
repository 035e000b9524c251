"""``stream_generate``: sampling on top of a ``Stream``, as an iterator of events."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .config import ConfigError, StreamConfig
from .stream import Stream


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


@dataclass
class _Detokenizer:
    """Incremental decoding in constant memory: only a short tail of tokens is ever re-decoded."""

    tokenizer: object
    ids: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 64:  # drop what can no longer change
            cut = self.prefix
            self.ids, self.prefix, self.read = self.ids[cut:], 0, self.read - cut
        return after[len(before) :]


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
        cut = (
            torch.cumsum(sorted_p, dim=-1) - sorted_p > sampling.top_p
        )  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    sampling: Sampling | None = None,
    config: StreamConfig | None = None,
    stream: Stream | None = None,
) -> Iterator[Event]:
    """Feed ``prompt`` (text or token ids) into a stream and generate from it, one ``Event`` per token.

    Pass ``stream`` to continue an existing conversation; otherwise a new one is made from ``config``. Every
    generated token is fed back into the stream, so the stream ends up holding the whole exchange.
    """
    sampling = sampling or Sampling()
    stream = stream or Stream(model, config)
    ids = tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    eos = set() if sampling.ignore_eos else _eos_ids(model, tokenizer)
    detok = _Detokenizer(tokenizer)
    hold = (
        max((len(s) for s in sampling.stop), default=1) - 1
    )  # text held back until no stop string can start in it
    pending = ""
    recent: list[int] = ids[-64:]

    start = time.perf_counter()
    logits = stream.feed(ids)
    prefill_s = time.perf_counter() - start
    decode_start = time.perf_counter()
    for n in range(1, sampling.max_new_tokens + 1):
        token = sample(logits, sampling, recent, generator)
        recent = (recent + [token])[-64:]
        logits = stream.feed([token])
        finish = "stop" if token in eos else ("length" if n == sampling.max_new_tokens else None)
        pending += "" if token in eos else detok.push(token)
        hit = min((i for i in (pending.find(s) for s in sampling.stop) if i >= 0), default=-1)
        if hit >= 0:
            pending, finish = pending[:hit], "stop"
        if finish is None:
            text, pending = pending[: max(0, len(pending) - hold)], pending[max(0, len(pending) - hold) :]
        else:
            text, pending = pending, ""
        elapsed = time.perf_counter() - decode_start
        yield Event(
            token,
            text,
            stream.cache_length,
            stream.tokens_seen,
            n,
            n / elapsed if elapsed else 0.0,
            prefill_s,
            finish,
        )
        if finish:
            return


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
