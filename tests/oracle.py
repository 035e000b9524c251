"""The reference oracle: the paper's algorithm written as plainly as possible, one token at a time.

It keeps every cached key *before* rotary (un-rotating what the model produced), and at every step rotates the
whole cache afresh: the query at its in-cache position n (the number of tokens held), the first ``num_sinks``
tokens at 0..S-1 and every other kept token at n minus its distance to the query in the text. For sinks plus a
window this is the paper's layout, positions 0..n in cache order. Eviction is a Python list trim, by the
paper's rule or by a ``keep(position, seen)`` rule given for another policy. Nothing here shares code with the
engine's storage, plans or attention; only ``rotate`` (itself checked against the model's own rotary) and the
rotary frequencies read off the model are reused.

Families whose attention is written in their own modules (BLOOM, MPT, Falcon) never reach the attention
registry; ``cache_oracle_logits`` runs the same algorithm through a transformers ``Cache`` handed to the model's
own code instead.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from streamllm.backends.arch import position_limit, shape_of
from streamllm.core.rotary import rotate

NAME = "streamllm_oracle"


class OracleState:
    def __init__(
        self,
        inv_freqs,
        num_sinks: int,
        window: int | None,
        text_positions: bool = False,
        keep=None,
        memory=None,
        recall_at=(),
    ):
        self.inv_freqs = inv_freqs
        self.num_sinks, self.window, self.text_positions, self.keep = num_sinks, window, text_positions, keep
        self.positions: dict[int, list[int]] = {}  # layer -> text position of each kept entry
        self.keys: dict[int, list[torch.Tensor]] = {}  # layer -> pre-rotary keys (B, Hkv, D)
        self.values: dict[int, list[torch.Tensor]] = {}
        self.t = 0  # text position of the token being processed
        self.order = None  # ``arch.rotary_order``: head dims reordered before anything turns them
        self.handed = 0  # the position the model rotated it at (t, or t wrapped below a rotary's limit)
        self.point = False  # whether token t selects what memory layers recall
        # Memory (a MemoryConfig, or None): every evicted entry, in the order it left, and the current selection.
        self.memory, self.recall_at = memory, set(recall_at)
        # mark -> query tokens, for content selection (``recall_at`` given as a dict); and the stream's tokens
        self.queries = dict(recall_at) if isinstance(recall_at, dict) else {}
        self.ids: list[int] = []
        self.gone: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> (pre-rotary key, value)
        self.chosen: dict[int, list[int]] = {}  # layer -> recalled block numbers, ascending
        self.n_recall = 0  # blocks each memory layer recalls until the next selection


def _select(state: OracleState, i: int, q_pre: torch.Tensor) -> None:
    """Brute force: every block's representative keys (per kv head, the keys farthest from the block's mean), a
    score per block (per query head the best logit at distance window + 1, summed), the best blocks."""
    mem = state.memory
    gone = state.gone.get(i, [])
    n_blocks = len(gone) // mem.block_size
    q = rotate(q_pre, torch.tensor([state.window + 1]), state.inv_freqs[i])[:, :, 0]  # (B, H, D)
    scores = []
    for b in range(n_blocks):
        keys = torch.stack([k for k, _ in gone[b * mem.block_size : (b + 1) * mem.block_size]], dim=2)
        keys = keys[0]  # (Hkv, bs, D)
        G = q.shape[1] // keys.shape[0]
        total = 0.0
        for h in range(q.shape[1]):
            k = keys[h // G]  # (bs, D)
            far = (k - k.mean(0)).norm(dim=-1)
            order = sorted(range(k.shape[0]), key=lambda j: (-float(far[j]), j))[: mem.reps]
            total += max(float(q[0, h] @ k[j]) for j in order)
        scores.append(total)
    state.chosen[i] = _choose(state, scores)


def _grams(ids: list[int]) -> list[tuple[int, ...]]:
    return [tuple(ids[j : j + n]) for n in (1, 2, 3) for j in range(len(ids) - n + 1)]


def _bm25(query: list[tuple[int, ...]], blocks: list[list[int]]) -> list[float]:
    """BM25 of the query's n-grams over token n-grams (n = 1..3) inside each block's text, k1 = 1.2, b = 0, rounded
    to 1e-9. The query's n-grams are those its tokens hold that the window before it does not."""
    bags = [_grams(b) for b in blocks]
    out = []
    for bag in bags:
        total = 0.0
        for term in set(query):
            tf = bag.count(term)
            if tf:
                df = sum(term in other for other in bags)
                total += math.log(1 + (len(bags) - df + 0.5) / (df + 0.5)) * tf * 2.2 / (tf + 1.2)
        out.append(round(total, 9))
    return out


def _seeds(query: set, blocks: list[list[int]], k: int) -> list[int]:
    """Greedy cover: the block with the best BM25 over the query terms no chosen block holds, while that is at
    least half the first one's."""
    chosen, covered, first = [], set(), 0.0
    for _ in range(k):
        gains = _bm25(query - covered, blocks)
        gains = [0.0 if b in chosen else g for b, g in enumerate(gains)]
        best = max(range(len(gains)), key=lambda b: (gains[b], -b), default=None)
        if best is None or gains[best] <= 0 or gains[best] < 0.5 * first:
            break
        first = first or gains[best]
        chosen.append(best)
        covered |= set(_grams(blocks[best])) & query
    return chosen


def _choose(state: OracleState, attention: list[float]) -> list[int]:
    """The blocks to recall by the memory's rule, from one layer's attention scores, written plainly."""
    mem, n, count = state.memory, state.n_recall, len(attention)
    marks = [p for p in state.queries if p <= state.t]
    content = seeds = None
    if mem.select != "attention" and marks:
        bs, S = mem.block_size, state.num_sinks
        over = min(bs // 4, state.window)  # each block's text runs on into the next one's first quarter
        blocks = [state.ids[S + b * bs : S + (b + 1) * bs + over] for b in range(count)]
        mark = max(marks)
        query = state.queries[mark][-512:]
        view = Counter(_grams(state.ids[max(mark + 1 - state.window, 0) : mark + 1]))
        asked = Counter(_grams(query))
        terms = {g for g in asked if view[g] <= asked[g]}
        content = _bm25(terms, blocks)
        seeds = _seeds(terms, blocks, n)
    by_attention = sorted(range(count), key=lambda b: (-attention[b], b))
    nb = mem.neighbours

    def with_next(blocks):
        return [j for b in blocks for j in range(b, min(b + 1 + nb, count))]

    if mem.select == "content" and seeds:  # the seeds, their neighbours, then around them
        around = [j for d in range(1, count) for s in seeds for j in (s - d, s + nb + d) if 0 <= j < count]
        touching = {j for s in seeds for j in range(s - 1, s + nb + 2)}  # the rest of a seed's lines
        alike = [b for b in range(count) if content[b] >= 0.5 * content[seeds[0]] and b not in touching]
        order = with_next(seeds) + [b for b in around + by_attention if b not in alike] + alike
    elif mem.select != "hybrid" or content is None or not any(content):
        order = with_next(by_attention)
    else:  # content proposes, attention chooses
        proposed = sorted(range(count), key=lambda b: (-content[b], -attention[b], b))[: 4 * n]
        chosen = sorted((b for b in proposed if content[b] > 0), key=lambda b: (-attention[b], b))
        order = with_next(chosen) + with_next(by_attention)
    picked = []
    for b in order:
        if b not in picked and len(picked) < n:
            picked.append(b)
    return sorted(picked)


def _kept(state: OracleState, positions: list[int], sliding_window: int | None) -> list[bool]:
    """Which entries of a layer's list stay after a step: sinks + last window (or a sliding layer's own window,
    or the given rule)."""
    n = len(positions)
    if sliding_window is not None:  # a local layer keeps its own window (never more than the cache budget)
        own = sliding_window - 1
        last = own if state.window is None else min(own, state.num_sinks + state.window)
        return [i >= n - last for i in range(n)]
    if state.keep is not None:
        return [bool(state.keep(torch.tensor(p), state.t + 1)) for p in positions]
    if state.window is None or n <= state.num_sinks + state.window:
        return [True] * n
    return [i < state.num_sinks or i >= n - state.window for i in range(n)]


def oracle_attention(
    module, query, key, value, attention_mask, scaling=None, oracle=None, sliding_window=None, **kwargs
):
    assert query.shape[2] == 1, "the oracle goes one token at a time"
    i, t = module.layer_idx, oracle.t
    order = oracle.order  # rotary on neighbouring dims: turned into the halves form
    if order is not None:
        query, key = query[..., order], key[..., order]
    inv_freq = oracle.inv_freqs[i]
    tpos = torch.tensor([oracle.handed])
    k_pre = rotate(key.double(), -tpos, inv_freq)[:, :, 0]  # (B, Hkv, D)
    q_pre = rotate(query.double(), -tpos, inv_freq)  # (B, H, 1, D)
    keys = oracle.keys.setdefault(i, []) + [k_pre]
    values = oracle.values.setdefault(i, []) + [value[:, :, 0].double()]
    positions = oracle.positions.setdefault(i, []) + [t]
    n = len(keys) - 1  # the query's in-cache position
    q_at = t if oracle.text_positions else n
    S = 0 if sliding_window is not None else oracle.num_sinks
    recalled_keys, recalled_values, recalled_at = [], [], []
    mem = oracle.memory if sliding_window is None else None
    if mem is not None:
        if oracle.point:
            _select(oracle, i, q_pre)
        bs = mem.block_size
        for b in oracle.chosen.get(i, []):
            for k, v in oracle.gone[i][b * bs : (b + 1) * bs]:
                recalled_keys.append(k)
                recalled_values.append(v)
        M = len(recalled_keys)
        if mem.positions == "cache":  # between the sinks and the window, in text order
            recalled_at = [S + u for u in range(M)]
            q_at = n + M
        else:  # every one just past the window
            recalled_at = [q_at - oracle.window - 1] * M
    k_at = torch.tensor([p if p < S else q_at - (t - p) for p in positions] + recalled_at)
    K = rotate(torch.stack(keys + recalled_keys, dim=2), k_at, inv_freq)  # (B, Hkv, n+1+M, D)
    V = torch.stack(values + recalled_values, dim=2)
    q = rotate(q_pre, torch.tensor([q_at]), inv_freq)  # (B, H, 1, D)
    G = q.shape[1] // K.shape[1]
    K, V = K.repeat_interleave(G, dim=1), V.repeat_interleave(G, dim=1)
    logits = (q @ K.transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5)
    if kwargs.get("softcap") is not None:  # Gemma2
        logits = torch.tanh(logits / kwargs["softcap"]) * kwargs["softcap"]
    if kwargs.get("s_aux") is not None:  # learned sink logits (gpt-oss): one more column per head, no value
        sink = kwargs["s_aux"].double().view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
        logits = torch.cat([logits, sink], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., : V.shape[2]]
    out = (probs @ V).to(query.dtype)  # (B, H, 1, D)
    stay = _kept(oracle, positions, sliding_window)
    if mem is not None:
        oracle.gone.setdefault(i, []).extend(
            (k, v) for k, v, s in zip(keys, values, stay, strict=True) if not s
        )
    oracle.keys[i] = [k for k, s in zip(keys, stay, strict=True) if s]
    oracle.values[i] = [v for v, s in zip(values, stay, strict=True) if s]
    oracle.positions[i] = [p for p, s in zip(positions, stay, strict=True) if s]
    return out.transpose(1, 2), None


AttentionInterface.register(NAME, oracle_attention)


@torch.no_grad()
def oracle_logits(
    model,
    ids: list[int],
    num_sinks: int,
    window: int | None,
    text_positions: bool = False,
    keep=None,
    memory=None,
    recall_at=(),
) -> torch.Tensor:
    """Logits (N, V) of streaming ``ids`` token by token under the paper's algorithm (or, with
    ``text_positions``, with every kept token at its original position; or with ``keep`` deciding which tokens
    stay; or with ``memory``, a ``MemoryConfig``, recalling evicted blocks, with extra selection points at
    ``recall_at``)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        state = OracleState(
            shape_of(model).inv_freqs, num_sinks, window, text_positions, keep, memory, recall_at
        )
        state.order = shape_of(model).rotary_order
        state.ids = list(ids)
        limit = position_limit(model.config)  # past it the model's rotary would change its frequencies
        rows = []
        for t, tok in enumerate(ids):
            state.t = t
            state.handed = t if limit is None else t % limit
            state.point = memory is not None and (t % memory.refresh == 0 or t in state.recall_at)
            if state.point:  # every memory layer holds the same number of blocks
                held = max((len(g) for g in state.gone.values()), default=0) // memory.block_size
                state.n_recall = min(memory.blocks, held)
            out = model(
                input_ids=torch.tensor([[tok]]),
                position_ids=torch.tensor([[state.handed]]),
                use_cache=False,
                oracle=state,
            )
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)
    finally:
        model.set_attn_implementation(previous)


class _TrimCache(Cache):
    """The paper's algorithm for families whose attention is written in their own modules (BLOOM, MPT, Falcon),
    run by that very code: each layer keeps a list of keys before rotary and their values; ``update`` appends the
    new token's and returns them all rotated at their in-cache positions 0..n, and ``trim`` keeps the first
    ``num_sinks`` and the last ``window`` after each token. An ALiBi model builds its bias over the n + 1 keys it
    is handed, so it sees in-cache distances; a rotary model is handed the query at position n."""

    def __init__(self, model, num_sinks: int, window: int):
        self.inv_freqs = shape_of(model).inv_freqs
        self.num_sinks, self.window = num_sinks, window
        self.keys: list[list[torch.Tensor]] = [[] for _ in self.inv_freqs]  # (B, Hkv, 1, D) each
        self.values: list[list[torch.Tensor]] = [[] for _ in self.inv_freqs]
        super().__init__(layers=[_ListLayer(self, i) for i in range(len(self.inv_freqs))])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n = len(self.keys[layer_idx])
        inv_freq = self.inv_freqs[layer_idx]
        self.keys[layer_idx].append(rotate(key_states.double(), torch.tensor([-n]), inv_freq))
        self.values[layer_idx].append(value_states)
        keys = torch.cat(self.keys[layer_idx], dim=2)  # (B, Hkv, n + 1, D)
        return rotate(keys, torch.arange(n + 1), inv_freq).to(key_states.dtype), torch.cat(
            self.values[layer_idx], dim=2
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return len(self.keys[layer_idx])

    def trim(self) -> None:
        S, W = self.num_sinks, self.window
        for entries in (*self.keys, *self.values):
            if len(entries) > S + W:
                del entries[S : len(entries) - W]


class _ListLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, owner: _TrimCache, idx: int):
        super().__init__()
        self.owner, self.idx = owner, idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.idx)

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length(self.idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


@torch.no_grad()
def cache_oracle_logits(model, ids: list[int], num_sinks: int, window: int) -> torch.Tensor:
    """Logits (N, V) of streaming ``ids`` token by token through the model's own attention code, with the
    paper's cache (``_TrimCache``). The model must not be prepared (or its streamllm forwards stand aside, as
    they do for a cache that is not streamllm's)."""
    cache = _TrimCache(model, num_sinks, window)
    rows = []
    for tok in ids:
        n = cache.get_seq_length()
        out = model(
            input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[n]]), cache=cache, use_cache=True
        )
        rows.append(out.logits[0, -1].float())
        cache.trim()
    return torch.stack(rows)
