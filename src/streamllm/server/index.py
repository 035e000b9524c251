"""Which known session a request's history extends: sessions by owner and by the digest of their text.

For each distinct text length L among an owner's sessions, the digest of the request's first L bytes is looked
up, in one incremental pass over the request; no session's text is read. A digest match is a candidate, which the
caller confirms against the session's own text.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator


class TextIndex:
    def __init__(self) -> None:
        # owner -> text length in bytes -> text digest -> session ids
        self._owners: dict[str, dict[int, dict[str, set[str]]]] = defaultdict(lambda: defaultdict(dict))

    def add(self, session_id: str, owner: str, length: int, sha256: str) -> None:
        self._owners[owner][length].setdefault(sha256, set()).add(session_id)

    def remove(self, session_id: str, owner: str, length: int, sha256: str) -> None:
        by_length = self._owners[owner]
        ids = by_length.get(length, {}).get(sha256)
        if ids:
            ids.discard(session_id)
            if not ids:
                del by_length[length][sha256]
                if not by_length[length]:
                    del by_length[length]

    def prefixes(self, owner: str, text: str) -> Iterator[tuple[int, str]]:
        """(length, session id) of every session of ``owner`` whose text digest is that of a prefix of ``text``,
        shortest first."""
        data = text.encode("utf-8")
        by_length = self._owners.get(owner, {})
        digest, done = hashlib.sha256(), 0
        for length in sorted(n for n in by_length if n <= len(data)):
            digest.update(data[done:length])
            done = length
            for session_id in by_length[length].get(digest.copy().hexdigest(), ()):
                yield length, session_id
