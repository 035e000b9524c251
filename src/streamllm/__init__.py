"""streamllm: StreamingLLM (Xiao et al., ICLR 2024) for current Hugging Face transformers."""

from .backends.arch import UnsupportedModelError
from .backends.hf import SinkCache, prepare
from .config import StreamConfig
from .core.cache import Evicted, KVCache
from .core.policy import DensePolicy, Policy, SinkPolicy, WindowPolicy
from .models import load_model
from .runtime.generate import Generation, Sampling, stream_generate
from .runtime.stream import Stream

__all__ = [
    "DensePolicy",
    "Evicted",
    "Generation",
    "KVCache",
    "Policy",
    "Sampling",
    "SinkCache",
    "SinkPolicy",
    "Stream",
    "StreamConfig",
    "UnsupportedModelError",
    "WindowPolicy",
    "load_model",
    "prepare",
    "stream_generate",
]
