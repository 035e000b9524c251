"""Tokens for pre-training: a byte-level BPE trained on the training documents, and the documents packed into one
stream each for training and held-out evaluation.

Documents are packed end to end, each followed by ``<|endoftext|>``; training sequences are cut from the training
stream at arbitrary offsets and start with no BOS (a BOS on every sequence would make every model a sink-token
model). ``<|sink|>`` is a vocabulary entry that only the sink-token variant ever sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...home import home
from . import corpus

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
SINK = "<|sink|>"
SPECIALS = (EOT, SINK)  # ids 0 and 1


def data_dir() -> Path:
    return home() / "pretrain" / "data"


@dataclass(frozen=True)
class Tokens:
    """A prepared folder: ``tokenizer.json``, ``train.npy`` and ``heldout.npy`` (uint16 streams), ``stats.json``."""

    folder: Path

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))

    def stream(self, split: str) -> np.ndarray:
        return np.load(self.folder / f"{split}.npy", mmap_mode="r")

    def stats(self) -> dict:
        return json.loads((self.folder / "stats.json").read_text())

    @property
    def vocab_size(self) -> int:
        return self.stats()["vocab_size"]

    @property
    def eot_id(self) -> int:
        return SPECIALS.index(EOT)

    @property
    def sink_id(self) -> int:
        return SPECIALS.index(SINK)


def prepare(folder: Path | None = None, vocab_size: int = 8192) -> Tokens:
    """The full corpus (every source of ``corpus.SOURCES``), fetched and tokenized once, then cached."""
    folder = folder or data_dir()
    if (folder / "stats.json").exists():
        return Tokens(folder)
    docs = ((source, name, text) for source in corpus.SOURCES for name, text in corpus.documents(source))
    return build(docs, folder, vocab_size)


def build(docs: Iterable[tuple[str, str, str]], folder: Path, vocab_size: int) -> Tokens:
    """Split ``(source, name, text)`` documents into training and held-out ones (whole documents), train the BPE on
    the training ones and write both token streams into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    train: list[tuple[str, str, str]] = []
    held: list[tuple[str, str, str]] = []
    for source, name, text in docs:
        (held if corpus.is_held_out(source, name) else train).append((source, name, text))
    if not train or not held:
        raise ValueError(f"need training and held-out documents, got {len(train)} and {len(held)}")
    # Held-out documents in hash order, so that the evaluation stream mixes the sources.
    held.sort(key=lambda d: hashlib.sha1(f"{d[0]}/{d[1]}".encode()).digest())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, _, text in train), trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    # source -> split -> [documents, tokens]
    sources: dict[str, dict[str, list[int]]] = {}
    stats: dict[str, object] = {"vocab_size": tok.get_vocab_size(), "sources": sources}
    for split, chosen in (("train", train), ("heldout", held)):
        ids = []
        for (source, _, _), enc in zip(chosen, _encode(tok, [t for _, _, t in chosen]), strict=True):
            row = sources.setdefault(source, {"train": [0, 0], "heldout": [0, 0]})
            row[split][0] += 1
            row[split][1] += len(enc) + 1
            ids.append(np.asarray(enc + [SPECIALS.index(EOT)], dtype=np.uint16))
        stream = np.concatenate(ids)
        np.save(folder / f"{split}.npy", stream)
        stats[f"{split}_tokens"] = int(stream.size)
        stats[f"{split}_documents"] = len(chosen)
    (folder / "stats.json").write_text(json.dumps(stats, indent=1))
    log.info("tokens: %d train, %d held out", stats["train_tokens"], stats["heldout_tokens"])
    return Tokens(folder)


def _encode(tok, texts: list[str], batch: int = 256) -> Iterable[list[int]]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for start in range(0, len(texts), batch):
        for enc in tok.encode_batch(texts[start : start + batch]):
            yield enc.ids


def batch_offsets(stream_len: int, step: int, seed: int, batch_size: int, seq_len: int) -> np.ndarray:
    """Start offsets (B,) of step ``step``'s sequences: a function of (seed, step) alone, so that every variant
    sees the same data and a resumed run the same batches as an uninterrupted one."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, stream_len - seq_len, size=batch_size)


def batch(stream: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """Training sequences (B, seq_len) of step ``step``, cut at arbitrary offsets of ``stream``."""
    offsets = batch_offsets(len(stream), step, seed, batch_size, seq_len)
    rows = np.stack([np.asarray(stream[o : o + seq_len], dtype=np.int64) for o in offsets])
    return torch.from_numpy(rows)  # (B, seq_len)
