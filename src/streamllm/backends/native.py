"""The decode step's C++ kernels (``decode_kernels.cpp``), compiled on first use by torch's extension builder.

The build takes about a minute once per machine and source version; it is kept under ``$STREAMLLM_HOME/build``.
Without a C++ compiler, or with ``STREAMLLM_NATIVE=0``, ``kernels()`` is None and decoding uses the Python step,
which computes the same thing more slowly.

It is built for this CPU (``-march=native``). ``STREAMLLM_NATIVE_FLAGS`` adds compiler flags after that one, so
that the kernels can be built as another CPU would build them: ``-march=x86-64-v3`` (AVX2, no AVX-512),
``-mno-avx512bf16 -mno-avx512vnni`` (AVX-512 without BF16 or VNNI). Each set of flags gets its own build folder. The AVX-512 code paths
are chosen at compile time; every one has a portable loop beside it, which is what AVX2-only x86 and Arm compile.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
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
        from torch.utils import cpp_extension

        extra = os.environ.get("STREAMLLM_NATIVE_FLAGS", "").split()
        build = home() / "build" / f"kernels-{_cpu_key()}{_flags_key(extra)}"
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            log.warning("building the native decode kernels for this machine (once; about a minute)")
        return cpp_extension.load(
            name="streamllm_decode_kernels",
            sources=[str(SOURCE)],
            build_directory=str(build),
            extra_cflags=["-O3", "-march=native", *extra, "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: all mean the Python step
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("native decode kernels unavailable, decoding in Python (slower): %s", first)
        return None


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
