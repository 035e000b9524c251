"""``Recompute``: the paper's sliding window with re-computation, the quality reference that keeps no cache.

Token t is predicted from the ``cache_size`` tokens before it, rebuilt from scratch through the model, so its
keys and values depend on where each window starts (unlike every cached policy). Windows are independent, so many
run as one batch. It stands where a ``KVCache`` stands in a ``Stream``: it keeps the recent tokens instead.
"""

from __future__ import annotations

import torch

# Tokens per forward when recompute batches independent windows.
RECOMPUTE_BATCH_TOKENS = 4096


class Recompute:
    def __init__(self, model, cache_size: int):
        self.model, self.cache_size = model, cache_size
        self.recent: list[int] = []  # the last cache_size tokens
        self.seen = 0

    def cache_length(self) -> int:
        """Tokens in its context window now."""
        return len(self.recent)

    def memory_bytes(self) -> int:
        return 0

    def state_dict(self) -> dict:
        return {"recent": torch.tensor(self.recent, dtype=torch.int32)}

    def load_state_dict(self, state: dict, seen: int) -> None:
        self.recent = [int(t) for t in state["recent"].tolist()]
        self.seen = seen

    @torch.no_grad()
    def forward(self, chunk: list[int], keep_all: bool) -> torch.Tensor:
        """Logits (T, V) of the new tokens (or only the last row), each from its own rebuilt window."""
        C = self.cache_size
        context = self.recent + chunk
        first = len(self.recent)  # index in context of the first new token
        wanted = range(first, len(context)) if keep_all else range(len(context) - 1, len(context))
        rows: dict[int, torch.Tensor] = {}
        # Tokens whose window starts at the context's beginning share one causal forward.
        prefix = [i for i in wanted if self.seen + (i - first) <= C]
        if prefix:
            ids = torch.tensor([context[: prefix[-1] + 1]])
            logits = self.model(input_ids=ids, use_cache=False).logits[0]  # (n, V)
            rows.update({i: logits[i] for i in prefix})
        full = [i for i in wanted if i not in rows]
        per_batch = max(1, RECOMPUTE_BATCH_TOKENS // (C + 1))
        for b in range(0, len(full), per_batch):
            group = full[b : b + per_batch]
            windows = torch.tensor([context[i - C : i + 1] for i in group])  # (b, C+1)
            logits = self.model(input_ids=windows, use_cache=False, logits_to_keep=1).logits[:, -1]  # (b, V)
            rows.update(dict(zip(group, logits, strict=True)))
        self.recent = context[-C:]
        self.seen += len(chunk)
        return torch.stack([rows[i] for i in wanted]).float()
