"""``Recompute``: the paper's sliding window with re-computation, the quality reference that keeps no cache.

Token t is predicted from the ``cache_size`` tokens before it, rebuilt from scratch through the model: a
*context* of its own, so its keys and values depend on where that context starts (unlike every cached policy).
Contexts are independent, so many run as one batch. It stands where a ``KVCache`` stands in a ``Stream``: it keeps
the recent tokens instead. (Not ``window``: that is the part of a cache after its sinks.)

A stream that starts with the model's BOS token (as streams of BOS-trained models do, Gemma and the Llama 3
family) has every rebuilt context start with it too, in place of the context's oldest token: each context is a new
sequence to the model, and such a model leans on BOS as its attention sink. Without it, recompute is not the
reference it is meant to be (Gemma-3-270m: 35.8 against sink's 18.9 at a cache of 128).
"""

from __future__ import annotations

import torch

# Tokens per forward when recompute batches independent contexts.
RECOMPUTE_BATCH_TOKENS = 4096


def context_prefix(model, ids) -> list[int]:
    """``[BOS]`` when the stream ``ids`` starts with the model's BOS token, else ``[]``: what starts every
    rebuilt context."""
    bos = getattr(model.config, "bos_token_id", None)
    return [bos] if isinstance(bos, int) and len(ids) > 0 and int(ids[0]) == bos else []


class Recompute:
    def __init__(self, model, cache_size: int):
        self.model, self.cache_size = model, cache_size
        self.recent: list[int] = []  # the last cache_size tokens
        self.prefix: list[int] = []  # starts every full context (``context_prefix`` of the stream)
        self.seen = 0

    def cache_length(self) -> int:
        """Tokens in its context now."""
        return len(self.recent)

    def memory_bytes(self) -> int:
        return 0

    def state_dict(self) -> dict:
        return {
            "recent": torch.tensor(self.recent, dtype=torch.int32),
            "prefix": torch.tensor(self.prefix, dtype=torch.int32),
        }

    def load_state_dict(self, state: dict, seen: int) -> None:
        self.recent = [int(t) for t in state["recent"].tolist()]
        self.prefix = [int(t) for t in state["prefix"].tolist()] if "prefix" in state else []
        self.seen = seen

    def changes(self) -> None:
        """No slots to save piecewise: a save is always the whole (small) state."""
        return None

    def mark_saved(self) -> None:
        pass

    @torch.no_grad()
    def forward(self, chunk: list[int], keep_all: bool) -> torch.Tensor:
        """Logits (T, V) of the new tokens (or only the last row), each from its own rebuilt context."""
        C = self.cache_size
        if self.seen == 0:
            self.prefix = context_prefix(self.model, chunk)
        P = len(self.prefix)
        context = self.recent + chunk
        first = len(self.recent)  # index in context of the first new token
        wanted = range(first, len(context)) if keep_all else range(len(context) - 1, len(context))
        rows: dict[int, torch.Tensor] = {}
        # Tokens whose context starts at the stream's beginning share one causal forward.
        prefix = [i for i in wanted if self.seen + (i - first) <= C]
        if prefix:
            ids = torch.tensor([context[: prefix[-1] + 1]])
            logits = self.model(input_ids=ids, use_cache=False).logits[0]  # (n, V)
            rows.update({i: logits[i] for i in prefix})
        full = [i for i in wanted if i not in rows]
        per_batch = max(1, RECOMPUTE_BATCH_TOKENS // (C + 1))
        for b in range(0, len(full), per_batch):
            group = full[b : b + per_batch]
            contexts = torch.tensor([self.prefix + context[i - C + P : i + 1] for i in group])  # (b, C+1)
            logits = self.model(input_ids=contexts, use_cache=False, logits_to_keep=1).logits[:, -1]  # (b, V)
            rows.update(dict(zip(group, logits, strict=True)))
        self.recent = context[-C:]
        self.seen += len(chunk)
        return torch.stack([rows[i] for i in wanted]).float()
