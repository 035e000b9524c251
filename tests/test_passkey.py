"""The passkey experiment's long-stream machinery: the stream sink and memory share, and checkpoints."""

import pytest
import torch

from streamllm.config import MemoryConfig, StreamConfig
from streamllm.experiments import Context
from streamllm.experiments import passkey as pk
from streamllm.runtime.stream import Stream

pytestmark = pytest.mark.real


def test_a_memory_that_never_refreshes_leaves_a_sink_cache_bit_for_bit(real):
    """sink, memory and memory-attention ask their questions from one stream: only true if its cache is a
    plain sink cache."""
    model, tokenizer = real
    ctx = Context(model, tokenizer, "smollm2-135m", "test", quick=True)
    ids, _ = pk.stream_ids(ctx, 700, ["12345"], [0.3])
    sink = Stream(model, StreamConfig(num_sinks=4, window=124))
    shared = Stream(model, StreamConfig(num_sinks=4, window=124, memory=MemoryConfig(64, refresh=pk.NEVER)))
    for stream in (sink, shared):
        stream.logits = [stream.feed(ids[:500]), *(stream.feed([t]) for t in ids[500:])]
    assert shared.memory.blocks >= 5  # it kept what left the window
    assert all(torch.equal(a, b) for a, b in zip(sink.logits, shared.logits, strict=True))
    tensors = {k: t for k, t in shared.state()[0].items() if k.startswith("layers.")}
    assert tensors and all(torch.equal(t, sink.state()[0][k]) for k, t in tensors.items())


class Interrupt(Exception):
    pass


def bar_stopping_after(updates, seen):
    """A progress bar that records where each run starts and raises after ``updates`` updates (None: never)."""

    class Bar:
        def __init__(self, total, desc):
            self.n = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            if self.n == 0:
                seen.append(n)
            self.n += 1
            if updates is not None and self.n > updates:
                raise Interrupt

    return Bar


def test_an_interrupted_long_stream_resumes_from_its_checkpoint_and_answers_the_same(
    real, tmp_path, monkeypatch
):
    model, tokenizer = real
    monkeypatch.setattr(pk, "CHECKPOINT", 1024)  # every stream of the run checkpoints,
    monkeypatch.setattr(pk, "FEED", 256)  # each 1024 tokens: a save after the fourth feed
    monkeypatch.setenv("STREAMLLM_HOME", str(tmp_path / "home"))

    def run(updates, seen):
        ctx = Context(
            model, tokenizer, "smollm2-135m", "test", quick=True, lengths=[2048], methods=["sink", "memory"]
        )
        ctx.bar = bar_stopping_after(updates, seen)
        return pk.passkey(ctx).csv_rows

    starts: list[int] = []
    with pytest.raises(Interrupt):
        run(6, starts)  # 1536 tokens fed, the state saved at 1024
    resumed = run(None, starts)
    assert starts == [0, 1024]  # the second run went on from the checkpoint
    assert len(list((tmp_path / "home" / "experiments" / "passkey").iterdir())) == 1
    monkeypatch.setenv("STREAMLLM_HOME", str(tmp_path / "fresh"))
    whole: list[int] = []
    assert run(None, whole) == resumed and whole == [0]
    assert {r[2] for r in resumed} == {"sink", "memory"}
