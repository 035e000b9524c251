"""``BlockFile``: the file a memory's blocks go to, appended to and never rewritten (``memory.py`` uses it for
its spill file past the RAM budget and for a server session's ``memory.bin``)."""

from __future__ import annotations

import json
import os
import secrets
import struct
import tempfile
import zlib
from pathlib import Path

import torch


class MemoryFileError(RuntimeError):
    """A memory file could not be written or read back, or is not this memory's: the stream cannot keep (or get
    back) its memory."""


_MAGIC = b"STREAMLLM-MEMORY"
HEADER = 4096  # the file's first bytes: the magic, then the layout as JSON, padded with spaces
# A block's record starts: layer, block, crc32 of its representative keys, crc32 of its keys and values.
_RECORD = struct.Struct("<iiII")


class BlockFile:
    """Blocks in a file, appended and never rewritten. Each record is one layer's block: a small header, then its
    representative keys (Hkv, r, D), keys and values (Hkv, bs, D), in the stream's dtype, with crc32s that reading
    checks. The file's first ``HEADER`` bytes name its layout and a random id, so a file of another model or
    another session is recognised.

    Without ``path`` the file is a temporary one in ``folder``, unlinked as soon as it is open (it goes with the
    process); with ``path`` it is a named file that outlives the stream (a server session's ``memory.bin``).
    Only bytes below ``size`` count: a writer that failed midway, or a crash, may leave more, which the next
    write overwrites."""

    def __init__(self, layout: dict, path: Path | None = None, folder: Path | None = None):
        self.layout, self.path, self.folder = layout, path, folder
        self.fd: int | None = None
        self.id: str | None = None
        self.size = 0
        kv_heads, head_dim, bs, r = (layout[k] for k in ("kv_heads", "head_dim", "block_size", "reps"))
        item = torch.empty(0, dtype=getattr(torch, layout["dtype"])).element_size()
        self.reps_bytes = kv_heads * r * head_dim * item
        self.kv_bytes = 2 * kv_heads * bs * head_dim * item
        self.record = _RECORD.size + self.reps_bytes + self.kv_bytes

    # -- opening -----------------------------------------------------------------------------------------------
    def create(self) -> None:
        """Open a new, empty file (a named one is replaced)."""
        try:
            if self.path is None:
                fd, name = tempfile.mkstemp(prefix="streamllm-memory-", dir=self.folder)
                os.unlink(name)  # the file lives as long as it is held open
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            where = self.path or self.folder or "the temp folder"
            raise MemoryFileError(f"cannot create a memory file in {where}: {exc.strerror}") from None
        self.fd, self.id = fd, secrets.token_hex(8)
        header = _MAGIC + json.dumps({"id": self.id, **self.layout}, sort_keys=True).encode()
        self._pwrite(header.ljust(HEADER, b" "), 0)
        self.size = HEADER

    def open(self, file_id: str, size: int) -> None:
        """Open the named file a saved state refers to: it must carry ``file_id`` and this layout, and hold at
        least ``size`` bytes. Anything past them is a turn that was never committed: it is never read, and the
        next ``append`` writes over it. Opening writes nothing, so a reader (a benchmark timing a saved stream)
        cannot harm a file that its writer is still appending to."""
        path = self.path
        if path is None:
            raise MemoryFileError("a temporary memory file cannot be opened again")
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise MemoryFileError(f"the memory file {path.name} is missing") from None
        except OSError as exc:
            raise MemoryFileError(f"the memory file {path.name} cannot be opened: {exc.strerror}") from None
        self.fd = fd
        head = os.pread(fd, HEADER, 0)
        try:
            found = json.loads(head[len(_MAGIC) :]) if head.startswith(_MAGIC) else None
        except ValueError:
            found = None
        if not isinstance(found, dict):
            raise MemoryFileError(f"{path.name} is not a streamllm memory file")
        if found.pop("id", None) != file_id:
            raise MemoryFileError(f"{path.name} belongs to another session (its id does not match)")
        if found != self.layout:
            raise MemoryFileError(f"{path.name} was written for another model or memory layout: {found}")
        have = os.fstat(fd).st_size
        if have < size:
            raise MemoryFileError(f"the memory file {path.name} is truncated: {have} of {size} bytes")
        self.id, self.size = file_id, size

    # -- records -----------------------------------------------------------------------------------------------
    def append(
        self, layer: int, block: int, reps: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> int:
        """Write one record at the end; -> its offset. Raises ``MemoryFileError`` (nothing counts as written)."""
        if self.fd is None:
            self.create()
        r = _raw(reps)
        kv = _raw(keys) + _raw(values)
        data = _RECORD.pack(layer, block, zlib.crc32(r), zlib.crc32(kv)) + r + kv
        offset = self.size
        self._pwrite(data, offset)
        self.size += len(data)
        return offset

    def read_reps(self, offset: int) -> tuple[int, int, bytes]:
        """(layer, block, representative keys' bytes) of the record at ``offset``."""
        data = self._pread(offset, _RECORD.size + self.reps_bytes)
        layer, block, crc, _ = _RECORD.unpack_from(data)
        reps = data[_RECORD.size :]
        if zlib.crc32(reps) != crc:
            raise MemoryFileError(f"memory file corrupted: the record at offset {offset} fails its checksum")
        return layer, block, reps

    def read_kv(self, offset: int) -> bytes:
        head = _RECORD.size + self.reps_bytes
        data = self._pread(offset, head + self.kv_bytes)
        _, _, _, crc = _RECORD.unpack_from(data)
        kv = data[head:]
        if zlib.crc32(kv) != crc:
            raise MemoryFileError(f"memory file corrupted: the record at offset {offset} fails its checksum")
        return kv

    def sync(self) -> None:
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                raise MemoryFileError(f"memory file sync failed: {exc.strerror}") from None

    def _open_fd(self) -> int:
        if self.fd is None:
            raise MemoryFileError("the memory file is not open")
        return self.fd

    def _pwrite(self, data: bytes, offset: int) -> None:
        fd, view = self._open_fd(), memoryview(data)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise MemoryFileError(f"memory file write failed: {exc.strerror}") from None

    def _pread(self, offset: int, n: int) -> bytes:
        if offset + n > self.size:
            raise MemoryFileError(f"memory file: no record at offset {offset}")
        data = os.pread(self._open_fd(), n, offset)
        if len(data) != n:
            raise MemoryFileError(f"memory file truncated: {len(data)} of {n} bytes at offset {offset}")
        return data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # a stream that is reset or dropped lets its file go
        self.close()


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
