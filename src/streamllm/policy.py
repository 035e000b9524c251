"""Which tokens a cache keeps and which positions they get: integer index math only, no model, no tensors of keys.

Letters: T new tokens (queries), K keys. Every position here is a *text* position: the index of a token in the
whole stream, counted from 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Policy:
    """Keep the first ``num_sinks`` tokens and the ``window`` most recent ones (``window=None``: keep all).

    Token-by-token semantics of the paper: between steps the cache holds at most ``num_sinks + window`` tokens,
    so token t attends to the sinks, the ``window`` tokens before t, and t itself.
    """

    num_sinks: int
    window: int | None
    text_positions: bool = False  # sinks seen at the query's text position, not its in-cache one (issue 6)

    def __post_init__(self) -> None:
        if self.num_sinks < 0 or (self.window is not None and self.window < 1):
            raise ValueError(f"invalid policy: num_sinks={self.num_sinks}, window={self.window}")

    @property
    def capacity(self) -> int | None:
        return None if self.window is None else self.num_sinks + self.window

    def for_layer(self, sliding_window: int | None) -> Policy:
        """The policy of one layer. A layer the model itself limits to a local window (Gemma3's sliding layers)
        keeps no sinks: it keeps its own window, or the whole cache budget if that is smaller."""
        if sliding_window is None:
            return self
        own = (
            sliding_window - 1
        )  # transformers: a query sees itself and the sliding_window - 1 keys before it
        budget = self.capacity
        return Policy(0, own if budget is None else min(own, budget))

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Which keys each query attends to. ``q_pos`` (T,), ``k_pos`` (K,) with -1 for an empty slot -> (T, K) bool."""
        q = q_pos[:, None]  # (T, 1)
        k = k_pos[None, :]  # (1, K)
        seen = (k >= 0) & (k <= q)  # (T, K)
        if self.window is None:
            return seen
        return seen & ((k < self.num_sinks) | (k >= q - self.window))  # (T, K)

    def cache_positions(self, q_pos: torch.Tensor) -> torch.Tensor:
        """The position each query has relative to the sinks (T,): its in-cache position (how many tokens the
        cache held when it was processed, the paper's choice) or, with ``text_positions``, its text position."""
        if self.capacity is None or self.text_positions:
            return q_pos
        return q_pos.clamp(max=self.capacity)

    def survivors(self, seen: int) -> list[int]:
        """Text positions held by the cache after ``seen`` tokens, oldest first."""
        if self.window is None or seen <= self.num_sinks + self.window:
            return list(range(seen))
        return list(range(self.num_sinks)) + list(range(seen - self.window, seen))

    def slot_of(self, pos: torch.Tensor) -> torch.Tensor:
        """Storage slot of each position: sinks in slots 0..S-1, the window in a ring after them. (N,)"""
        if self.window is None:
            return pos
        ring = self.num_sinks + (pos - self.num_sinks).remainder(self.window)  # (N,)
        return torch.where(pos < self.num_sinks, pos, ring)

    def kept_after(self, pos: torch.Tensor, seen: int) -> torch.Tensor:
        """Which of ``pos`` (N,) the cache still holds once ``seen`` tokens have been processed. (N,) bool"""
        if self.window is None:
            return torch.ones_like(pos, dtype=torch.bool)
        return (pos < self.num_sinks) | (pos >= seen - self.window)
