"""The cache is open: a policy defined here, in this file alone, runs through every backend and matches the oracle.

``Milestones`` keeps the sinks, the window, and every 4th token that has left the window, the latest 3 of them.
Nothing outside this file knows about it: it is a ``Policy`` subclass with its own ``kept`` and ``anchor``.
"""

import dataclasses
import shutil
from dataclasses import dataclass

import pytest
import torch
from oracle import oracle_logits
from tiny import tiny_model

import streamllm
from streamllm import Evicted, Policy, StreamConfig
from streamllm.backends import native
from streamllm.runtime.stream import Stream


@dataclass(frozen=True)
class Milestones(Policy):
    num_sinks: int = 2
    window: int = 6
    every: int = 4
    extra: int = 3

    @property
    def capacity(self) -> int:
        return self.num_sinks + self.window + self.extra

    def kept(self, pos, seen):
        edge = seen - self.window  # tokens before it have left the window
        latest = (edge - 1) // self.every * self.every  # the latest milestone that has left it
        milestone = (pos % self.every == 0) & (pos < edge) & (pos > latest - self.extra * self.every)
        return (pos < self.num_sinks) | (pos >= edge) | (milestone & (pos >= self.num_sinks))

    def anchor(self, q_pos):
        # The in-cache position: how many tokens the cache holds when the token is processed (it fills up in
        # steps as milestones accumulate, so the default min(t, capacity) does not apply).
        return torch.tensor([int(self.kept(torch.arange(t), t).sum()) for t in q_pos.tolist()])


POLICY = Milestones()
CONFIG = StreamConfig(num_sinks=POLICY.num_sinks, window=POLICY.window, rebase_every=5)
N = 48


def _ids(seed=0):
    return torch.randint(0, 101, (N,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(model, ids):
    return oracle_logits(model, ids, POLICY.num_sinks, None, keep=POLICY.kept)


def _stream_rows(model, ids, decode, chunk=1, prefill=3):
    """Logits (N, V): ``prefill`` tokens as one chunk, then ``chunk`` tokens at a time."""
    stream = Stream(model, dataclasses.replace(CONFIG, decode=decode, chunk_size=chunk), policy=POLICY)
    rows = list(stream.chunks(ids[:prefill]))
    rows += list(stream.chunks(ids[prefill:]))
    return torch.cat(rows), stream


def test_the_policy_keeps_milestones():
    pos = torch.arange(40)
    assert pos[POLICY.kept(pos, 40)].tolist() == [0, 1, 24, 28, 32, 34, 35, 36, 37, 38, 39]
    assert POLICY.anchor(torch.tensor([3, 40])).tolist() == [3, 11]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma3_text"])
@pytest.mark.parametrize("chunk", [1, 5, N])
def test_transformers_backend_matches_oracle(arch, chunk):
    model = streamllm.prepare(tiny_model(arch))
    ids = _ids()
    got, stream = _stream_rows(model, ids, "transformers", chunk)
    assert (got - _reference(model, ids)).abs().max() < 1e-4
    assert stream.cache.cache_length() == POLICY.capacity
    assert stream.cache.offset > 0 or chunk == N  # rebased on the way (between chunks)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("step", ["python", "native"])
def test_decode_steps_match_oracle(arch, step, monkeypatch):
    if step == "native" and (shutil.which("c++") is None or native.kernels() is None):
        pytest.skip("no C++ compiler here: decoding uses the Python step")
    model = streamllm.prepare(tiny_model(arch))
    ids = _ids(seed=1)
    want = _reference(model, ids)
    stream = Stream(model, dataclasses.replace(CONFIG, decode="fast"), policy=POLICY)
    if step == "python":
        monkeypatch.setattr(stream.decoder, "native", None)
    rows = list(stream.chunks(ids[:3]))
    for token in ids[3:]:
        assert stream.decoder.ready(stream.cache)
        rows.append(stream.feed([token])[None])
    assert (torch.cat(rows) - want).abs().max() < 1e-4


def _evictions(model, ids, chunk, decode):
    gone: dict[int, list[int]] = {}

    def keep(e: Evicted):
        assert e.keys.shape[2] == e.positions.numel() == e.values.shape[2]
        gone.setdefault(e.layer, []).extend(e.positions.tolist())

    stream = Stream(
        model, dataclasses.replace(CONFIG, decode=decode, chunk_size=chunk), policy=POLICY, on_evict=keep
    )
    stream.feed(ids)
    return gone, stream


@pytest.mark.parametrize(("chunk", "decode"), [(1, "fast"), (1, "transformers"), (7, "transformers")])
def test_every_token_that_leaves_reaches_the_hook_once(chunk, decode):
    model = streamllm.prepare(tiny_model("llama"))
    ids = _ids(seed=2)
    gone, stream = _evictions(model, ids, chunk, decode)
    pos = torch.arange(N)
    left = sorted(pos[~POLICY.kept(pos, N)].tolist())
    assert len(gone) == len(stream.cache.layers)
    for positions in gone.values():
        assert sorted(positions) == left  # each exactly once, whatever the chunking
