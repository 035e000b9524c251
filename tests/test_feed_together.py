"""``feed_together``: one pass that feeds the next token of several streams goes on as each stream's own would."""

import pytest
import torch
from tiny import tiny_model

import streamllm
from streamllm import StreamConfig
from streamllm.config import MemoryConfig
from streamllm.runtime.stream import Stream, feed_together


@pytest.mark.parametrize("decode", ["fast", "transformers"])
def test_streams_fed_together_go_on_as_alone(decode):
    model = streamllm.prepare(tiny_model("llama"))
    config = StreamConfig(num_sinks=2, window=14, rebase_every=8, decode=decode)
    ids = torch.randint(0, 101, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    lengths = [2, 16, 50]
    alone, together = [Stream(model, config) for _ in lengths], [Stream(model, config) for _ in lengths]
    for a, b, n in zip(alone, together, lengths, strict=True):
        a.feed(ids[:n])
        b.feed(ids[:n])
    for step in range(20):
        tokens = [ids[n + step] for n in lengths]
        want = torch.stack([s.feed([t]) for s, t in zip(alone, tokens, strict=True)])  # (R, V)
        got = feed_together(together, tokens)  # (R, V)
        assert (want - got).abs().max() < 2e-4 and torch.equal(want.argmax(-1), got.argmax(-1))
    assert [s.tokens_seen for s in together] == [n + 20 for n in lengths]


def test_a_stream_that_cannot_share_a_pass_is_refused():
    model = streamllm.prepare(tiny_model("llama"))
    memory = StreamConfig(
        num_sinks=2, window=6, memory=MemoryConfig(block_size=4, blocks=2, reps=2, refresh=5)
    )
    recompute = StreamConfig(num_sinks=2, window=6, method="recompute")
    streams = [
        Stream(model, StreamConfig(num_sinks=2, window=6)),
        Stream(model, memory),
        Stream(model, recompute),
    ]
    for s in streams:
        s.feed([1, 2, 3])
    assert [s.batchable for s in streams] == [True, True, False]  # the last: its recompute keeps no cache
    with pytest.raises(ValueError, match="cannot share a pass"):
        feed_together(streams[1:], [4, 5])
    streams[1].feed(list(range(4, 21)))  # 20 tokens: blocks in memory, and the next (position 20) selects
    assert streams[1].memory.blocks > 0 and not streams[1].batchable  # a selecting token goes alone
    with pytest.raises(ValueError, match="cannot share a pass"):
        feed_together(streams[:2], [6, 6])
    streams[1].feed([21])
    assert streams[1].batchable
