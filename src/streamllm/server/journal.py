"""Append-only saves: a session's journal, the turns saved since its last whole state file.

A whole state (``persist.encode_state``) holds every cached slot, the whole token log and the whole text: for the
bundled model at 4+1020 in float32 that is 47 MB, rewritten after every turn of perhaps 50 tokens. After the first
save a turn instead appends one **record** to ``journal-<generation>.bin`` (the generation of the state file it
follows), holding only what the turn changed:

- the tokens fed and the text added since the last save (the log and the text only ever grow);
- the stream's changes (``Stream.changes``): per layer, the cache slots written since the last save (one per
  token, as stored) with every slot's position and the counters, and the memory's state (its counters and
  unfinished block; its blocks are in ``memory.bin`` already).

A record is ``<payload length: 8 bytes little-endian><sha256 of the payload: 32 bytes><payload>``, the payload a
safetensors blob whose metadata ``record`` is a JSON header. ``meta.json`` stays the commit point: it names the
journal and how many of its bytes are committed, so a crash between the append and the commit leaves a tail that
the next load ignores and the next append cuts off. A load replays the committed records, each checked against its
digest, on top of the state file.

A whole state is written again (and the journal starts afresh) when the cache cannot say what changed (a rebase
turned every window key, a state was loaded from elsewhere, the method keeps no slots), or when the journal has
grown to the size of the state file, so that a load never reads more than twice a state file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from array import array
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..runtime.stream import Stream

RECORD_HEAD = struct.Struct("<Q32s")  # payload bytes, sha256 of the payload


class JournalError(Exception):
    """A journal that cannot be replayed (truncated, corrupted, or not following its state file)."""


def journal_name(generation: int) -> str:
    return f"journal-{generation:08d}.bin"


def log_tensors(text: bytes, tokens: array) -> dict[str, torch.Tensor]:
    """The conversation's text (UTF-8) and tokens as the tensors a state file or a record holds them in."""
    return {
        "log.tokens": torch.from_numpy(np.frombuffer(tokens.tobytes(), dtype=np.int32).copy()),
        "log.text": torch.from_numpy(np.frombuffer(bytes(text), dtype=np.uint8).copy()),
    }


def log_of(tensors: dict[str, torch.Tensor]) -> tuple[bytearray, array]:
    """The text and tokens that ``log_tensors`` made tensors of."""
    text = bytearray(tensors["log.text"].numpy().tobytes())
    return text, array("i", tensors["log.tokens"].to(torch.int32).numpy().tobytes())


def encode_record(saved: dict, convo, stream: Stream) -> tuple[bytes, dict] | None:
    """(the record, its header) of what changed since the save ``saved`` (its meta) described: the
    conversation's unsaved text and tokens, and the stream's changes; or None where a whole state must be written
    instead. A memory's new blocks are appended to its file first (``Stream.persist``)."""
    text_from, tokens_from = int(saved["text_bytes"]), int(saved["tokens_seen"])
    follows = (
        text_from + len(convo.unsaved_text) == convo.text_bytes
        and tokens_from + len(convo.unsaved_tokens) == convo.token_count
    )
    if "journal" not in saved or not follows:
        return None
    stream.persist()  # first: the memory's state names the file's length after it
    changes = stream.changes()
    if changes is None:
        return None
    tensors, changed = changes
    tensors |= log_tensors(convo.unsaved_text, convo.unsaved_tokens)
    header = {"text_from": text_from, "tokens_from": tokens_from} | changed
    payload = save_tensors(tensors, metadata={"record": json.dumps(header)})
    return RECORD_HEAD.pack(len(payload), hashlib.sha256(payload).digest()) + payload, header


def parse(data: bytes) -> list[tuple[dict, dict]]:
    """The records in a journal's committed bytes: (header, tensors) each, checked against its digest; raises
    ``JournalError``. A header and its tensors, less the log's, are one of the stream's ``changes``."""
    return list(_records(data))


def extend_log(records: list[tuple[dict, dict]], text: bytearray, tokens: array) -> None:
    """Extend the text and token log of the state file the records follow (in place) by what each adds; raises
    ``JournalError`` where one does not follow the one before."""
    for n, (header, tensors) in enumerate(records):
        if header["tokens_from"] != len(tokens) or header["text_from"] != len(text):
            raise JournalError(f"journal record {n + 1} does not follow the state before it")
        added, fed = log_of(tensors)
        text.extend(added)
        tokens.extend(fed)


def logs(data: bytes):
    """The text (bytes) and tokens each record adds, in order, each record checked against its digest but its
    cache tensors left unread; raises ``JournalError``."""
    for payload in _payloads(data):
        try:
            (_, text), (_, tokens) = raw_tensors(payload, ("log.text", "log.tokens"))
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise JournalError(f"a journal record is unreadable ({exc})") from None
        yield text, array("i", tokens)


def raw_tensors(blob: bytes, names) -> list[tuple[str, bytes]]:
    """(safetensors dtype, raw bytes) of the tensors ``names`` of a safetensors blob, reading its header once and
    none of its other tensors; raises ``struct.error``, ``ValueError``, ``KeyError`` or ``TypeError``."""
    (size,) = struct.unpack_from("<Q", blob, 0)
    entries = json.loads(blob[8 : 8 + size])
    base = 8 + size
    out = []
    for name in names:
        start, end = entries[name]["data_offsets"]
        out.append((entries[name]["dtype"], blob[base + start : base + end]))
    return out


def _records(data: bytes):
    for payload in _payloads(data):
        try:
            header = json.loads(metadata(payload)["record"])
            tensors = load_tensors(payload)
        except (SafetensorError, ValueError, KeyError, TypeError) as exc:
            raise JournalError(f"a journal record is unreadable ({exc})") from None
        yield header, tensors


def _payloads(data: bytes):
    """Each record's payload, checked against its length and digest."""
    at = 0
    while at < len(data):
        if at + RECORD_HEAD.size > len(data):
            raise JournalError("the journal ends inside a record's head")
        size, digest = RECORD_HEAD.unpack_from(data, at)
        payload = data[at + RECORD_HEAD.size : at + RECORD_HEAD.size + size]
        if len(payload) != size:
            raise JournalError("the journal ends inside a record")
        if hashlib.sha256(payload).digest() != digest:
            raise JournalError("a journal record is corrupted (its sha256 does not match)")
        yield payload
        at += RECORD_HEAD.size + size


def metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob."""
    (size,) = struct.unpack_from("<Q", blob, 0)
    return json.loads(blob[8 : 8 + size]).get("__metadata__") or {}


def append(path: Path, committed: int, record: bytes) -> int:
    """Append ``record`` to the journal after its ``committed`` bytes (cutting off a tail that a crash left
    uncommitted) and sync it. -> the journal's new length"""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, committed)
        os.lseek(fd, committed, os.SEEK_SET)
        view = memoryview(record)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return committed + len(record)


def read(path: Path, committed: int) -> bytes:
    """The committed bytes of a journal; raises ``JournalError`` where there are fewer."""
    if committed == 0:
        return b""
    try:
        with open(path, "rb") as f:
            data = f.read(committed)
    except OSError as exc:
        raise JournalError(f"the journal is unreadable ({exc.strerror})") from None
    if len(data) != committed:
        raise JournalError(f"the journal is truncated ({len(data)} of {committed} committed bytes)")
    return data
