"""Sessions saved before a stream gave and took its own state still load.

``tests/data/session-v2/<case>`` was written by streamllm as of commit 2b89061 (the server flattened the cache
itself then), with ``TINY_LLAMA`` and the settings below: ``state.safetensors`` after 40 tokens, ``journal.bin``
one record of the next 10, ``after.safetensors`` the whole state after all 50, ``memory.bin`` the memory's blocks
(the ``memory`` case). Restoring the first two must give the stream the third one describes, tensor for tensor.
The tensors are data, so the test does not depend on the tiny model's random weights.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from tiny import tiny_model

import streamllm
from streamllm import StreamConfig
from streamllm.config import MemoryConfig
from streamllm.runtime.stream import Stream
from streamllm.server.journal import metadata
from streamllm.server.persist import decode_state

DATA = Path(__file__).parent / "data" / "session-v2"
IDS = torch.randint(0, 101, (50,), generator=torch.Generator().manual_seed(3)).tolist()
CASES = {
    "plain": StreamConfig(num_sinks=2, window=30, decode="transformers"),
    "int8": StreamConfig(num_sinks=2, window=30, kv_dtype="int8", decode="transformers"),
    "memory": StreamConfig(
        num_sinks=2,
        window=6,
        decode="transformers",
        memory=MemoryConfig(block_size=4, blocks=2, reps=2, refresh=5, ram_mb=1),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_version_2_session_loads_as_it_was_saved(case, tmp_path):
    folder = tmp_path / case
    shutil.copytree(DATA / case, folder)
    config = CASES[case]
    meta = json.loads((folder / "meta.json").read_text())
    blob, records = (folder / "state.safetensors").read_bytes(), (folder / "journal.bin").read_bytes()
    after = (folder / "after.safetensors").read_bytes()
    stream = Stream(streamllm.prepare(tiny_model("llama")), config, memory_file=folder / "memory.bin")
    convo = decode_state(meta, blob, stream, records)
    assert convo.token_count == stream.tokens_seen == 50
    tensors, state = stream.state()
    want = load_tensors(after)
    want_state = json.loads(metadata(after)["state"])
    assert state == want_state
    want = {k: t for k, t in want.items() if not k.startswith("log.")}
    assert sorted(tensors) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(tensors[name], tensor), name
