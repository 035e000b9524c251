"""streamllm: StreamingLLM (Xiao et al., ICLR 2024) for current Hugging Face transformers."""

from .arch import UnsupportedModelError, prepare
from .cache import SinkCache
from .config import StreamConfig

__all__ = ["SinkCache", "StreamConfig", "UnsupportedModelError", "prepare"]
