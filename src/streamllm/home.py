"""``$STREAMLLM_HOME`` (default ``~/.cache/streamllm``): where pulled models, the native build and data live."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("STREAMLLM_HOME", Path.home() / ".cache" / "streamllm"))
