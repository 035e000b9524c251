"""The decode step's C++ kernels (``decode_kernels.cpp``), compiled on first use by torch's extension builder.

The build takes about a minute once per machine and source version; it is kept under ``$STREAMLLM_HOME/build``.
Builds survive interruption: torch's builder marks a build in progress with a lock file that stays behind when
its process is killed, and every later build would wait on it forever. ``build_extension`` therefore builds under
an flock of its own, which the kernel releases when the holder dies: whoever holds it knows any torch lock file
left in the folder is stale, and removes it with a notice. Two processes starting at once build once: the second
waits (with a notice), then loads the first one's build.
Without a C++ compiler, or with ``STREAMLLM_NATIVE=0``, ``kernels()`` is None and decoding uses the Python step,
which computes the same thing more slowly.

It is built for this CPU (``-march=native``). ``STREAMLLM_NATIVE_FLAGS`` adds compiler flags after that one, so
that the kernels can be built as another CPU would build them: ``-march=x86-64-v3`` (AVX2, no AVX-512),
``-mno-avx512bf16 -mno-avx512vnni`` (AVX-512 without BF16 or VNNI). Each set of flags gets its own build folder. The AVX-512 code paths
are chosen at compile time; every one has a portable loop beside it, which is what AVX2-only x86 and Arm compile.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..home import home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_kernels.cpp")
NONE = torch.empty(0)  # what the C++ side reads as "absent" (a tensor argument it does not use)


def enabled() -> bool:
    """False where ``STREAMLLM_NATIVE=0`` asks for the Python decode step."""
    return os.environ.get("STREAMLLM_NATIVE", "1") != "0"


@functools.cache
def kernels():
    """The compiled module (its ``Step`` class), or None with one warning where it cannot be built."""
    if not enabled():
        return None
    try:
        extra = os.environ.get("STREAMLLM_NATIVE_FLAGS", "").split()
        build = home() / "build" / f"kernels-{_cpu_key()}{_flags_key(extra)}"
        return build_extension(
            "streamllm_decode_kernels",
            SOURCE,
            build,
            cflags=["-O3", "-march=native", *extra, "-fopenmp"],
            ldflags=["-fopenmp"],
            what="the native decode kernels for this machine (once; about a minute)",
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: all mean the Python step
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("native decode kernels unavailable, decoding in Python (slower): %s", first)
        return None


def build_extension(name: str, source: Path, build: Path, cflags: list[str], ldflags: list[str], what: str):
    """Compile ``source`` into the Python module ``name`` in the folder ``build`` (or load the build kept there)
    under the folder's build lock. ``what`` names it in the notice that a build starts. Raises OSError naming
    the lock where it cannot be taken, and whatever the compiler's failure raises."""
    from torch.utils import cpp_extension

    build.mkdir(parents=True, exist_ok=True)
    with _build_lock(build / "build.flock"):
        # torch's marker of a build in progress: nobody holds our lock, so nobody builds
        stale = build / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that was interrupted", stale)
            stale.unlink(missing_ok=True)
        if not any(build.glob("*.so")):
            log.warning("building %s", what)
        return cpp_extension.load(
            name=name,
            sources=[str(source)],
            build_directory=str(build),
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            verbose=False,
        )


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; the kernel drops it when this process ends, however it ends."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OSError(f"cannot take the build lock {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is building in %s; waiting for it", path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise OSError(f"cannot take the build lock {path}: {exc.strerror or exc}") from None
        yield
    finally:
        os.close(fd)


def _flags_key(extra: list[str]) -> str:
    return "-" + hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8] if extra else ""


def _cpu_key() -> str:
    """The build is for this CPU (-march=native): its folder is named by the architecture and a digest of the
    instruction-set flags, so a home folder shared by machines of different kinds keeps one build per kind."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"
