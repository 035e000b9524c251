"""streamllm: StreamingLLM (Xiao et al., ICLR 2024) for current Hugging Face transformers."""

from .arch import UnsupportedModelError, prepare
from .cache import SinkCache
from .config import StreamConfig
from .generate import Sampling, stream_generate
from .models import load_model
from .stream import Stream

__all__ = [
    "Sampling",
    "SinkCache",
    "Stream",
    "StreamConfig",
    "UnsupportedModelError",
    "load_model",
    "prepare",
    "stream_generate",
]
