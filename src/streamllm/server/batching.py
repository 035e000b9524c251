"""One pass that decodes the next token of several streams at once (``streamllm serve --batch-decode``).

Streams on a fast decode path go through the native decoder's ``step_many``; the rest as follows.
Each stream keeps its own ``SinkCache``, at its own positions. For one batched step, ``StackedCache`` hands every
layer the stored keys of each stream plus its new key, and the model attends with plain SDPA under a per-row
mask built from each stream's policy. Exactness is that of the single-stream engine (``attention.attend``),
reached another way: instead of rotating the query a second time for the sink block, each stream's sink keys
are rotated forward by the same amount (a rotation moves both sides of a dot product alike), so one query per
row serves both blocks. Only the fixed-size policies (sink, window) of models whose layers all share one
policy can be batched; ``batchable`` says which streams qualify.

Batched arithmetic rounds differently from single-row arithmetic, so a greedy reply can depend on which other
streams shared its steps; that is why batching is opt-in.

Letters: K streams in the batch, Hkv kv heads, C slots per stream, D head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from ..rotary import rotate_half, shift_angles
from ..stream import Stream


def batchable(stream: Stream) -> bool:
    """Whether this stream can join a batched decode step."""
    cache = stream.cache
    if cache is None or cache.policy.capacity is None or not cache.layers:
        return False
    return all(layer.policy == cache.policy and layer.keys is not None for layer in cache.layers)


class StackedCache(Cache):
    """The caches of K streams seen as one batch, for one decode step (one new token per stream)."""

    def __init__(self, streams: Sequence[Stream]):
        super().__init__(layers=[])
        self.streams = list(streams)
        first = self.streams[0].cache.layers[0]
        self.positions = [s.cache.layers[0].seen for s in self.streams]  # the new tokens' text positions
        policy = first.policy
        # How far each stream's sink keys move: from their in-cache positions to where the (virtual) query
        # position makes the distance come out as the in-cache one.
        self.sink_shift = [
            (t - s.cache.layers[0].offset) - int(policy.cache_positions(torch.tensor([t]))[0])
            for t, s in zip(self.positions, self.streams, strict=True)
        ]

    def mask(self) -> torch.Tensor:
        """Which keys each row's query sees: the stream's stored slots, then its own new key. (K, 1, 1, C+1)"""
        rows = []
        for t, stream in zip(self.positions, self.streams, strict=True):
            layer = stream.cache.layers[0]
            k_pos = torch.cat([layer.slot_pos, torch.tensor([t])])  # (C+1,)
            rows.append(layer.policy.visible(torch.tensor([t]), k_pos))  # (1, C+1)
        return torch.stack(rows)[:, None]  # (K, 1, 1, C+1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Keys (K, Hkv, 1, D) rotated at each stream's virtual position -> (K, Hkv, C+1, D) to attend over;
        then each stream commits its new key, as the single-stream engine does after attending."""
        layers = [stream.cache.layers[layer_idx] for stream in self.streams]
        K, Hkv, _, D = key_states.shape
        C = layers[0].keys.shape[2]
        # One copy of each stream's storage into the batch (the stored keys cannot be attended in place: the
        # new key's slot still holds a key the new token must see).
        keys = key_states.new_empty(K, Hkv, C + 1, D)  # (K, Hkv, C+1, D)
        values = value_states.new_empty(K, Hkv, C + 1, D)  # (K, Hkv, C+1, D)
        for row, layer in enumerate(layers):
            keys[row, :, :C], values[row, :, :C] = layer.keys[0], layer.values[0]
        keys[:, :, C:], values[:, :, C:] = key_states, value_states
        S = layers[0].policy.num_sinks
        if S and any(self.sink_shift):
            shift = torch.tensor(self.sink_shift, dtype=torch.long)  # (K,)
            cos, sin = shift_angles(shift, layers[0].inv_freq)  # (K, R) each
            keys[:, :, :S] = _rotate_rows(keys[:, :, :S], cos, sin)
        for row, layer in enumerate(layers):
            layer.commit(
                key_states[row : row + 1], value_states[row : row + 1], torch.tensor([self.positions[row]])
            )
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        raise RuntimeError("StackedCache expects an explicit 4D attention mask")


def _rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``x`` (K, Hkv, S, D) by its own angles ``cos``/``sin`` (K, R), as ``rotary.rotate``
    does for one shift (only the first R dims rotate)."""
    r = cos.shape[-1]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos.to(work)[:, None, None, :], sin.to(work)[:, None, None, :]  # (K, 1, 1, R)
    part = x[..., :r].to(work)  # (K, Hkv, S, R)
    part = part * cos + rotate_half(part) * sin
    return torch.cat((part.to(x.dtype), x[..., r:]), dim=-1) if r < x.shape[-1] else part.to(x.dtype)


@torch.no_grad()
def decode_step(model, streams: Sequence[Stream], tokens: Sequence[int]) -> torch.Tensor:
    """Feed one token to each of ``streams`` in a single pass. -> next-token logits (K, V)

    Streams that share one native fast decoder (``decode.Decoder.step_many``) go through it: every weight is read
    once for all of them and each attends over its own cache in place. Others go through the model's forward
    over a ``StackedCache``."""
    for stream in streams:
        stream.cache.maybe_rebase(1)
    decoder = streams[0].decoder
    if (
        decoder is not None
        and decoder.native is not None
        and all(
            s.decoder is decoder and decoder.ready(s.cache) and s.cache.policy == streams[0].cache.policy
            for s in streams
        )
    ):
        logits = decoder.step_many([s.cache for s in streams], tokens)  # (K, V)
        for stream in streams:
            stream.tokens_seen += 1
        return logits
    stacked = StackedCache(streams)
    positions = torch.cat([s.cache.position_ids(1) for s in streams])  # (K, 1) virtual positions
    out = model(
        input_ids=torch.tensor([[t] for t in tokens]),
        position_ids=positions,
        attention_mask=stacked.mask(),
        cache=stacked,
        use_cache=True,
        logits_to_keep=1,
    )
    for stream in streams:
        stream.tokens_seen += 1
    return out.logits[:, -1].float()  # (K, V)
