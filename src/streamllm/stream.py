"""``Stream``: one endless stream of tokens through a model, under one of the paper's methods.

``feed`` takes any number of new tokens and processes them in chunks of ``chunk_size``; every token inside a
chunk sees exactly what it would see if fed alone (the attention mask comes from the cache policy), so a long
prompt never silently gets dense attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .arch import prepare
from .cache import SinkCache
from .config import StreamConfig
from .decode import decoder_for

# Tokens per forward when recompute batches independent windows.
RECOMPUTE_BATCH_TOKENS = 4096


class Stream:
    def __init__(self, model, config: StreamConfig | None = None):
        self.model = prepare(model)
        self.config = config or StreamConfig()
        weights = {"fast": "model", "int4": "int4"}.get(self.config.decode)  # config.decode: see StreamConfig
        uses_cache = self.config.method != "recompute"  # recompute rebuilds every window through the model
        self.decoder = decoder_for(self.model, weights) if weights and uses_cache else None
        self.reset()

    def reset(self) -> None:
        """Forget everything: a fresh, empty cache."""
        self.cache = None if self.config.method == "recompute" else SinkCache(config=self.config)
        self.recent: list[int] = []  # recompute: the last cache_size tokens
        self.tokens_seen = 0

    @property
    def cache_length(self) -> int:
        """Tokens held in the cache now (recompute: in its context window)."""
        return len(self.recent) if self.cache is None else self.cache.cache_length()

    def cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        return self.cache.memory_bytes()

    @torch.no_grad()
    def feed(self, ids: Sequence[int]) -> torch.Tensor:
        """Process new tokens; returns the logits (V,) that predict the token after the last one."""
        if len(ids) == 0:
            raise ValueError("nothing to feed")
        last = None
        for logits in self.chunks(ids, keep_all=False):
            last = logits
        return last[-1]

    @torch.no_grad()
    def chunks(self, ids: Sequence[int], keep_all: bool = True) -> Iterator[torch.Tensor]:
        """Process new tokens chunk by chunk, yielding each chunk's logits (T, V) (or only the last row)."""
        ids = [int(i) for i in ids]
        step = self.config.chunk_size
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            if self.cache is None:
                yield self._recompute(chunk, keep_all)
            else:
                yield self._forward(chunk, keep_all)

    def _forward(self, chunk: list[int], keep_all: bool) -> torch.Tensor:
        T = len(chunk)
        self.cache.maybe_rebase(T)
        if T == 1 and self.decoder is not None and self.decoder.ready(self.cache):
            logits = self.decoder.step(self.cache, chunk[0])  # (V,)
            self.tokens_seen += 1
            return logits[None]
        try:
            out = self.model(
                input_ids=torch.tensor([chunk]),
                position_ids=self.cache.position_ids(T),
                cache=self.cache,
                use_cache=True,
                logits_to_keep=0 if keep_all else 1,
            )
        except BaseException:
            # Layers that already committed this chunk make the cache unusable; the caller should reset().
            self.cache.discard_pending()
            raise
        self.tokens_seen += T
        return out.logits[0].float()  # (T, V) or (1, V)

    def _recompute(self, chunk: list[int], keep_all: bool) -> torch.Tensor:
        """Sliding window with re-computation: token t is predicted from the cache_size tokens before it,
        rebuilt from scratch. Windows are independent, so many run as one batch."""
        C = self.config.cache_size
        context = self.recent + chunk
        first = len(self.recent)  # index in context of the first new token
        wanted = range(first, len(context)) if keep_all else range(len(context) - 1, len(context))
        rows: dict[int, torch.Tensor] = {}
        # Tokens whose window starts at the context's beginning share one causal forward.
        prefix = [i for i in wanted if self.tokens_seen + (i - first) <= C]
        if prefix:
            logits = self.model(input_ids=torch.tensor([context[: prefix[-1] + 1]]), use_cache=False).logits[
                0
            ]
            rows.update({i: logits[i] for i in prefix})
        full = [i for i in wanted if i not in rows]
        per_batch = max(1, RECOMPUTE_BATCH_TOKENS // (C + 1))
        for b in range(0, len(full), per_batch):
            group = full[b : b + per_batch]
            windows = torch.tensor([context[i - C : i + 1] for i in group])  # (b, C+1)
            logits = self.model(input_ids=windows, use_cache=False, logits_to_keep=1).logits[:, -1]
            rows.update(dict(zip(group, logits, strict=True)))
        self.recent = context[-C:]
        self.tokens_seen += len(chunk)
        return torch.stack([rows[i] for i in wanted]).float()
