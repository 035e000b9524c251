"""Memory of evicted blocks: the engine matches a brute-force oracle on every architecture, chunked equals token
by token, blocks spill to a file past the RAM budget and come back intact, and bad settings are refused."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from oracle import oracle_logits
from tiny import ARCHS, tiny_model

import streamllm
from streamllm import StreamConfig
from streamllm.backends import native
from streamllm.config import ConfigError, MemoryConfig
from streamllm.core.selection import choose
from streamllm.runtime.stream import Stream

MEMORY = MemoryConfig(block_size=4, blocks=2, reps=2, refresh=5, ram_mb=1, select="attention")
CONFIG = StreamConfig(num_sinks=2, window=6, rebase_every=7, memory=MEMORY)
N = 60


def _ids(seed=0, n=N):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _stream_rows(model, ids, config, chunk, recall_at=()):
    stream = Stream(model, dataclasses.replace(config, chunk_size=chunk))
    for pos in recall_at:
        stream.memory.recall_at(pos)
    return torch.cat(list(stream.chunks(ids))), stream


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positions", ["cache", "fixed"])
def test_chunked_and_token_by_token_match_the_oracle(arch, positions):
    model = streamllm.prepare(tiny_model(arch))
    config = dataclasses.replace(CONFIG, memory=dataclasses.replace(MEMORY, positions=positions))
    ids = _ids()
    marks = (23, 41)
    want = oracle_logits(model, ids, 2, 6, memory=config.memory, recall_at=marks)
    for chunk in (1, 7, N):
        got, stream = _stream_rows(
            model, ids, dataclasses.replace(config, decode="transformers"), chunk, marks
        )
        assert (got - want).abs().max() < 1e-4, (arch, positions, chunk)
    stats = stream.memory.stats()
    assert stats["blocks"] == (N - 6 - 2) // 4  # tokens 2..N-7 have left the window
    assert stats["recalled"] == 2 * 4 and stats["selections"] > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("select,neighbours", [("content", 1), ("hybrid", 0)])
def test_content_selection_matches_the_oracle(arch, select, neighbours):
    """Blocks chosen by the tokens they share with a query (BM25 over n-grams), alone or proposing candidates
    for attention, with neighbours: chunked and token by token, the oracle's plain BM25 chooses the same."""
    model = streamllm.prepare(tiny_model(arch))
    memory = dataclasses.replace(MEMORY, select=select, neighbours=neighbours)
    config = dataclasses.replace(CONFIG, memory=memory, decode="transformers")
    ids = _ids(seed=6)
    queries = {29: ids[12:17], 47: ids[20:23]}
    want = oracle_logits(model, ids, 2, 6, memory=memory, recall_at=queries)
    for chunk in (1, 7, N):
        stream = Stream(model, dataclasses.replace(config, chunk_size=chunk))
        for pos, query in queries.items():
            stream.memory.recall_at(pos, query)
        got = torch.cat(list(stream.chunks(ids)))
        assert (got - want).abs().max() < 1e-4, (arch, select, chunk)
    by_attention = oracle_logits(model, ids, 2, 6, memory=MEMORY, recall_at=queries)
    assert (by_attention[29:] - want[29:]).abs().max() > 1e-3  # the query's tokens changed what was recalled


def test_content_selection_finds_the_block_that_holds_the_query():
    """The block holding a rare run of tokens is recalled by content in every layer, and with neighbours the
    block after it too; a repeated run (in every block) counts for nothing."""
    model = streamllm.prepare(tiny_model("llama"))
    filler = [7, 8, 9, 10] * 30
    ids = filler[:2] + filler[2:42] + [50, 51, 52, 53] + filler[:60]
    memory = dataclasses.replace(MEMORY, select="content", neighbours=1)
    stream = Stream(model, dataclasses.replace(CONFIG, memory=memory, decode="transformers"))
    stream.feed(ids, recall=True, query=[7, 8, 50, 51, 52, 9])
    needle = (42 - 2) // 4  # the block holding tokens 42..45
    for mem in stream.memory.layers.values():
        assert mem.selected == [needle, needle + 1]
    assert stream.memory.stats()["text_index_bytes"] > 0


def test_look_alikes_of_a_seed_fill_a_slot_only_when_nothing_else_is_left():
    """Content selection recalls the seed and the blocks around it, but not a block that scores nearly as
    well (another door's pass key): a small model would copy that one instead."""
    attention = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0])  # attention alone would take block 5
    content = np.array([0.0, 1.0, 0.0, 10.0, 0.0, 6.0, 1.0, 0.0])  # block 5 looks like the seed, block 3
    assert choose(attention, 3, "content", 0, content, seeds=[3]) == [2, 3, 4]
    assert choose(attention, 4, "content", 0, content, seeds=[3]) == [1, 2, 3, 4]
    assert choose(attention[:6], 6, "content", 0, content[:6], seeds=[3]) == [0, 1, 2, 3, 4, 5]  # last resort
    # the block right after a seed holds the rest of its line (the index reads on across the boundary): it
    # scores like a look-alike but is the seed's own continuation, and comes first
    # block 4: the seed's line goes on; block 5: a look-alike. Nearest first: the one before, then after.
    content = np.array([0.0, 0.0, 0.0, 10.0, 8.0, 9.0, 0.0, 0.0])
    assert choose(attention, 2, "content", 0, content, seeds=[3]) == [2, 3]
    assert choose(attention, 3, "content", 0, content, seeds=[3]) == [2, 3, 4]
    assert choose(attention, 4, "content", 0, content, seeds=[3]) == [1, 2, 3, 4]


def test_memory_changes_what_the_stream_computes():
    """The recalled blocks really are attended: without them the logits differ from the oracle's."""
    model = streamllm.prepare(tiny_model("llama"))
    ids = _ids(seed=3)
    plain = torch.cat(list(Stream(model, dataclasses.replace(CONFIG, memory=None)).chunks(ids)))
    with_memory = oracle_logits(model, ids, 2, 6, memory=MEMORY)
    late = slice(20, None)  # once blocks exist
    assert (plain[late] - with_memory[late]).abs().max() > 1e-2
    assert (plain[:13] - with_memory[:13]).abs().max() < 1e-4  # nothing to recall yet


@pytest.mark.parametrize("positions", ["cache", "fixed"])
@pytest.mark.parametrize("step", ["native", "python", "transformers"])
def test_decoding_matches_the_oracle(step, positions, monkeypatch):
    if step == "native" and (shutil.which("c++") is None or native.kernels() is None):
        pytest.skip("no C++ compiler here: decoding uses the Python step")
    model = streamllm.prepare(tiny_model("qwen2"))
    ids = _ids(seed=4)
    memory = dataclasses.replace(MEMORY, positions=positions)
    want = oracle_logits(model, ids, 2, 6, memory=memory)
    decode = "transformers" if step == "transformers" else "fast"
    stream = Stream(model, dataclasses.replace(CONFIG, decode=decode, memory=memory))
    if step == "python":
        monkeypatch.setattr(stream.decoder, "native", None)
    elif step == "native":
        calls = []
        step_many = stream.decoder.step_many
        monkeypatch.setattr(stream.decoder, "step_many", lambda *a: calls.append(1) or step_many(*a))
    rows = list(stream.chunks(ids[:9]))
    for token in ids[9:]:
        rows.append(stream.feed([token])[None])
    assert (torch.cat(rows) - want).abs().max() < 1e-4
    if step == "native":  # every token but the selection points went through the C++ step
        # the first block (tokens 2..5) is held once token 11 is processed: selections start at token 12
        points = [t for t in range(9, N) if t % MEMORY.refresh == 0 and t >= 12]
        assert len(calls) == N - 9 - len(points)


def test_feed_with_recall_selects_at_the_last_token():
    model = streamllm.prepare(tiny_model("llama"))
    ids = _ids(seed=5)
    want = oracle_logits(model, ids, 2, 6, memory=MEMORY, recall_at=(38,))
    stream = Stream(model, dataclasses.replace(CONFIG, decode="transformers", chunk_size=64))
    first = stream.feed(ids[:39], recall=True)
    assert (first - want[38]).abs().max() < 1e-4
    rest = torch.cat(list(stream.chunks(ids[39:])))
    assert (rest - want[39:]).abs().max() < 1e-4


def test_blocks_past_the_budget_go_to_a_file_and_come_back(tmp_path):
    """A budget of a few blocks: the older blocks live in the file, and the results do not change."""
    model = streamllm.prepare(tiny_model("llama"))
    ids = _ids(seed=6, n=90)
    # one block of both layers: layers, k and v, kv heads, head dim, float32, tokens
    block_bytes = 2 * 2 * 2 * 16 * 4 * MEMORY.block_size
    small = dataclasses.replace(MEMORY, ram_mb=1, dir=tmp_path)
    big, _ = _stream_rows(model, ids, dataclasses.replace(CONFIG, decode="transformers"), 9)
    stream = Stream(model, dataclasses.replace(CONFIG, decode="transformers", chunk_size=9, memory=small))
    budget = 16 * block_bytes  # the smallest budget a config can state is 1 MiB; the rule is the same
    stream.memory.kept.budget = budget
    got = torch.cat(list(stream.chunks(ids)))
    stats = stream.memory.stats()
    assert stats["layer_blocks_on_disk"] > 0 and stats["disk_bytes"] > 0
    assert (
        stats["layer_blocks_in_ram"] > 0 and 0 < stats["ram_bytes"] <= budget
    )  # representative keys included
    assert (got - big).abs().max() < 1e-5
    assert list(tmp_path.iterdir()) == []  # the file is unlinked once open: it goes with the stream


def test_a_full_disk_stops_the_stream_with_a_clear_error(tmp_path, monkeypatch):
    import errno
    import os

    from streamllm.core.memory import MemoryFileError

    model = streamllm.prepare(tiny_model("llama"))
    stream = Stream(
        model,
        dataclasses.replace(CONFIG, decode="transformers", memory=dataclasses.replace(MEMORY, dir=tmp_path)),
    )
    stream.memory.kept.budget = 1  # every block goes to the file

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(MemoryFileError, match="No space left on device"):
        stream.feed(_ids(seed=7))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("block_size", 0, "block_size must be >= 1"),
        ("blocks", -1, "blocks must be >= 1"),
        ("reps", 9, "cannot exceed the block size"),
        ("refresh", 0, "refresh must be >= 1"),
        ("ram_mb", 0, "ram_mb must be >= 1"),
        ("positions", "text", "unknown memory positions"),
    ],
)
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(MemoryConfig(block_size=8), **{field: value})


def test_a_budget_below_one_block_is_refused():
    model = streamllm.prepare(tiny_model("llama"))
    with pytest.raises(ValueError, match="smaller than one block"):
        Stream(model, StreamConfig(memory=MemoryConfig(block_size=8192, ram_mb=1)))


def test_memory_needs_the_sink_method():
    with pytest.raises(ConfigError, match="sink method"):
        StreamConfig(method="window", memory=MemoryConfig())
    with pytest.raises(ConfigError, match="sink method"):
        StreamConfig(positions="text", memory=MemoryConfig())


def test_representative_keys_beyond_the_budget_stop_the_stream():
    model = streamllm.prepare(tiny_model("llama"))
    stream = Stream(model, dataclasses.replace(CONFIG, decode="transformers"))
    stream.memory.kept.budget = (
        600  # every block moves to the file; soon its representative keys alone are too many
    )
    with pytest.raises(ValueError, match="representative keys alone"):
        stream.feed(_ids(seed=8))


# -- saved with a stream, restored, rolled back ---------------------------------------------------------------
def _convo(ids):
    """A session's conversation that has fed ``ids``."""
    from streamllm.server.persist import Conversation

    return Conversation.of(b"t", ids, turns=1)


def _log(ids):
    """That conversation's whole text and token log, as a whole state saves them."""
    from array import array

    return b"t", array("i", ids)


def _saved(model, config, ids, path, budget=None):
    """A stream with its memory file at ``path`` after ``ids``, saved as a server session saves it."""
    from streamllm.server.persist import encode_state

    stream = Stream(model, config, memory_file=path)
    if budget is not None:
        stream.memory.kept.budget = budget
    stream.feed(ids)
    meta, blob = encode_state("s" * 32, "owner", "tiny", config, _convo(ids), stream, _log(ids))
    return stream, meta, blob


def _restored(model, config, meta, blob, path):
    from streamllm.server.persist import decode_state

    stream = Stream(model, config, memory_file=path)
    decode_state(meta, blob, stream)
    return stream


@pytest.mark.parametrize("decode", ["transformers", "fast"])
@pytest.mark.parametrize("positions", ["cache", "fixed"])
def test_a_saved_memory_restores_and_rolls_back_exactly(tmp_path, decode, positions):
    """Saved mid-stream (some blocks spilled past the budget, the last selection in force), a fresh stream
    restored from the file continues bit for bit; the live stream rolled back to the state does too."""
    model = streamllm.prepare(tiny_model("llama"))
    memory = dataclasses.replace(MEMORY, positions=positions)
    config = dataclasses.replace(CONFIG, decode=decode, memory=memory)
    ids = _ids(seed=9, n=130)
    path = tmp_path / "memory.bin"
    block_bytes = 2 * 2 * 2 * 16 * 4 * MEMORY.block_size
    live, meta, blob = _saved(model, config, ids[:63], path, budget=8 * block_bytes)
    assert 63 % MEMORY.refresh != 0 and live.memory.recalled_len > 0  # continuing needs the recall slots
    stats = live.memory.stats()
    assert stats["blocks"] == meta["memory"]["layers"]["0"]["count"] > 4
    assert path.stat().st_size == meta["memory"]["file_bytes"]
    restored = _restored(model, config, meta, blob, path)
    assert restored.memory.stats()["blocks"] == stats["blocks"]
    snapshot = live.state()
    ahead = [live.feed([t]) for t in ids[63:100]]  # more blocks, selections, spills
    live.load(snapshot)
    for i, token in enumerate(ids[63:]):
        got, back = restored.feed([token]), live.feed([token])
        assert torch.equal(got, back), i
        if i < len(ahead):
            assert torch.equal(back, ahead[i]), i


def test_each_save_appends_only_the_new_blocks(tmp_path):
    from streamllm.server.persist import encode_state

    model = streamllm.prepare(tiny_model("llama"))
    config = dataclasses.replace(CONFIG, decode="transformers")
    ids = _ids(seed=10, n=120)
    path = tmp_path / "memory.bin"
    stream, meta, _ = _saved(model, config, ids[:50], path)
    first = path.read_bytes()
    blocks = meta["memory"]["layers"]["0"]["count"]
    stream.feed(ids[50:])
    convo_meta, _ = encode_state("s" * 32, "owner", "tiny", config, _convo(ids), stream, _log(ids))
    now = path.read_bytes()
    assert now[: len(first)] == first  # nothing rewritten
    added = convo_meta["memory"]["layers"]["0"]["count"] - blocks
    record = (len(now) - len(first)) / (2 * added)  # two memory layers
    # one record: its header, representative keys (Hkv, r, D) and keys and values (Hkv, bs, D), float32
    assert added > 0 and record == 16 + (2 * 2 * 16 + 2 * 2 * 4 * 16) * 4


def test_a_crash_after_the_memory_was_written_loses_nothing_committed(tmp_path):
    """Blocks appended for a turn whose meta.json never committed are never read when the session loads, and the
    turns after it write over them."""
    model = streamllm.prepare(tiny_model("llama"))
    config = dataclasses.replace(CONFIG, decode="transformers")
    ids = _ids(seed=11, n=120)
    path = tmp_path / "memory.bin"
    reference, meta, blob = _saved(model, config, ids[:50], path)
    committed = path.stat().st_size
    crashed = _restored(model, config, meta, blob, path)
    crashed.feed(ids[50:90])
    crashed.memory.persist()  # the next turn's blocks reach the file, then the process dies
    assert path.stat().st_size > committed
    restored = _restored(model, config, meta, blob, path)
    assert path.stat().st_size > committed  # opening writes nothing: the torn tail waits to be written over
    for token in ids[50:]:
        assert torch.equal(restored.feed([token]), reference.feed([token]))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "memory file memory.bin is missing"),
        ("truncated", "is truncated"),
        ("flipped", "fails its checksum"),
        ("other session", "belongs to another session"),
        ("other layout", "another model or memory layout"),
    ],
)
def test_a_damaged_memory_file_is_a_clear_error(tmp_path, damage, message):
    import json

    from streamllm.server.persist import StateError

    model = streamllm.prepare(tiny_model("llama"))
    config = dataclasses.replace(CONFIG, decode="transformers")
    path = tmp_path / "memory.bin"
    _, meta, blob = _saved(model, config, _ids(seed=12, n=80), path)
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[:-100])
    elif damage == "flipped":
        path.write_bytes(data[: 4096 + 20] + bytes([data[4096 + 20] ^ 0xFF]) + data[4096 + 21 :])
    elif damage == "other session":
        _saved(model, config, _ids(seed=13, n=80), path)
    else:
        header = json.loads(data[16:4096])
        header["head_dim"] = 8
        head = b"STREAMLLM-MEMORY" + json.dumps(header, sort_keys=True).encode()
        path.write_bytes(head.ljust(4096, b" ") + data[4096:])
    with pytest.raises(StateError, match=message):
        _restored(model, config, meta, blob, path)


def test_a_failed_save_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    import errno
    import os

    from streamllm.core.memory import MemoryFileError

    model = streamllm.prepare(tiny_model("llama"))
    config = dataclasses.replace(CONFIG, decode="transformers")
    ids = _ids(seed=14, n=120)
    path = tmp_path / "memory.bin"
    stream, meta, blob = _saved(model, config, ids[:50], path)
    size = stream.memory.kept.store.size
    saved = [len(s) for s in stream.memory.kept.saved.values()]
    stream.feed(ids[50:100])
    write = os.pwrite
    calls = []

    def full_after_one(*args):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(*args)

    monkeypatch.setattr(os, "pwrite", full_after_one)
    with pytest.raises(MemoryFileError, match="No space left on device"):
        stream.memory.persist()
    assert (
        stream.memory.kept.store.size == size and [len(s) for s in stream.memory.kept.saved.values()] == saved
    )
    monkeypatch.setattr(os, "pwrite", write)
    stream.memory.persist()  # the disk has room again: the same blocks are written, nothing is lost
    assert all(len(stream.memory.kept.saved[i]) == m.count for i, m in stream.memory.layers.items())
