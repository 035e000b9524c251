"""How a server process writes its log: plain lines, or one JSON object per line for log shippers
(``--log-format json``)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

FORMATS = ("text", "json")
TEXT = "[%(name)s] %(message)s"


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time, level, logger, message, and an access line's fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            line.update({k: v for k, v in access.items() if k not in line})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(log_format: str) -> None:
    """Write the root logger's lines (and so the server's, uvicorn's when it leaves its own config out, and the
    access lines) in ``log_format``; access lines and the server's opening line are written whatever the level
    otherwise."""
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; choose one of {', '.join(FORMATS)}")
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(formatter)
    logging.getLogger("streamllm.access").setLevel(logging.INFO)
    # the one line that says what the server runs (cache, memory, store, limits), in the same format
    logging.getLogger("streamllm.server.app").setLevel(logging.INFO)
