"""Which tokens a cache keeps and where a query sees them: integer index math only, no model, no tensors of keys.

Every position here is a *text* position: the index of a token in the whole stream, counted from 0. A policy is
three rules (``docs/design.md``, "Adding a policy"):

- ``kept(pos, seen)``: which tokens the cache still holds once ``seen`` tokens have been processed. It must be
  monotone (a token that has left never comes back) and hold at most ``capacity`` tokens.
- the first ``num_sinks`` tokens are *anchored*: stored rotated at positions 0..S-1 and seen from the query's
  ``anchor`` position. Every other key is seen at its distance in the text.
- ``anchor(q_pos)``: where a query stands relative to the anchored keys.

Everything else (what each query of a chunk sees, which slot a token goes to, what leaves) follows from these in
``plan.py``, so token-by-token and chunked processing agree by construction.

Letters: T queries, K keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Policy:
    """The base of every eviction policy. Subclasses are frozen dataclasses (hashable: layers that share a policy
    share one plan) and define ``kept``; ``num_sinks``, ``capacity`` and ``anchor`` have defaults."""

    num_sinks = 0  # the anchored first tokens (a dataclass field in policies that have them)

    @property
    def ring(self) -> int | None:
        """W where the policy is a ring: it keeps the first num_sinks tokens and the W before ``seen``, and a query
        past the capacity stands at the capacity (``plan.RingPlan`` plans its steady tokens without tensor work);
        None where it is not."""
        return None

    @property
    def capacity(self) -> int | None:
        """The most tokens ``kept`` ever holds; None when it grows without bound."""
        return None

    def kept(self, pos: torch.Tensor, seen: int | torch.Tensor) -> torch.Tensor:
        """Which of ``pos`` the cache holds once ``seen`` tokens have been processed (broadcasts). -> bool"""
        raise NotImplementedError

    def anchor(self, q_pos: torch.Tensor) -> torch.Tensor:
        """The position of each query (T,) relative to the anchored keys: its in-cache position, which is the
        number of tokens the cache held when it was processed (the paper's choice). This default is right for
        policies that hold ``min(t, capacity)`` tokens before token t; a policy that fills up otherwise says so."""
        if self.capacity is None:
            return q_pos
        return q_pos.clamp(max=self.capacity)

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Which keys each query attends to: itself, and what the cache held when it was processed.
        ``q_pos`` (T,), ``k_pos`` (K,) with -1 for an empty slot -> (T, K) bool."""
        q = q_pos[:, None]  # (T, 1)
        k = k_pos[None, :]  # (1, K)
        return (k >= 0) & ((k == q) | ((k < q) & self.kept(k, q)))  # (T, K)

    def for_layer(self, sliding_window: int | None) -> Policy:
        """The policy of one layer. A layer the model itself limits to a local span (its ``sliding_window``:
        Gemma3's sliding layers) keeps no sinks: a ``WindowPolicy`` whose window is what that span lets a query see,
        or the whole cache budget if that is smaller."""
        if sliding_window is None:
            return self
        # transformers: a query sees itself and the sliding_window - 1 keys before it
        own = sliding_window - 1
        budget = self.capacity
        return WindowPolicy(own if budget is None else min(own, budget))


@dataclass(frozen=True)
class SinkPolicy(Policy):
    """StreamingLLM: the first ``num_sinks`` tokens plus the ``window`` most recent ones. Token t attends to the
    sinks, the ``window`` tokens before it, and itself.

    ``text_positions``: sinks are seen at the query's text position instead of its in-cache one, so their distance
    grows without bound (the other reading of the paper, kept to settle which is right)."""

    num_sinks: int = 4
    window: int = 1020
    text_positions: bool = False

    def __post_init__(self) -> None:
        if self.num_sinks < 0 or self.window < 1:
            raise ValueError(f"invalid policy: num_sinks={self.num_sinks}, window={self.window}")

    @property
    def capacity(self) -> int:
        return self.num_sinks + self.window

    def kept(self, pos, seen):
        return (pos < self.num_sinks) | (pos >= seen - self.window)

    def anchor(self, q_pos):
        return q_pos if self.text_positions else q_pos.clamp(max=self.capacity)

    @property
    def ring(self) -> int | None:
        return None if self.text_positions else self.window


@dataclass(frozen=True)
class WindowPolicy(Policy):
    """Window attention: the ``window`` most recent tokens, nothing anchored."""

    window: int

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"invalid policy: window={self.window}")

    @property
    def capacity(self) -> int:
        return self.window

    @property
    def ring(self) -> int:
        return self.window

    def kept(self, pos, seen):
        return pos >= seen - self.window


@dataclass(frozen=True)
class DensePolicy(Policy):
    """Dense attention: nothing is ever evicted; the cache grows with the stream."""

    def kept(self, pos, seen):
        return torch.ones_like(pos, dtype=torch.bool) if isinstance(pos, torch.Tensor) else True
