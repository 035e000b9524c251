"""Tiny randomly initialised models of every supported architecture (seconds to run, catch adapter mistakes)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=4096
)


def _configs():
    gqa = dict(COMMON, num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": tf.LlamaConfig(**gqa),
        "mistral": tf.MistralConfig(**gqa, sliding_window=None),
        "qwen2": tf.Qwen2Config(**gqa),
        "qwen3": tf.Qwen3Config(**gqa, head_dim=16),
        "gpt_neox": tf.GPTNeoXConfig(**dict(COMMON, num_attention_heads=4), rotary_pct=0.5),
        "phi": tf.PhiConfig(**dict(COMMON, num_attention_heads=4), partial_rotary_factor=0.5),
        "gemma3_text": tf.Gemma3TextConfig(
            **dict(gqa, num_hidden_layers=4),
            head_dim=16,
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        ),
    }


ARCHS = list(_configs())


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = _configs()[arch]
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model
