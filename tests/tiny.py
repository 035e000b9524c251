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
        # partial rotary as in Phi-4-mini; its released ids lie outside the tiny vocabulary
        "phi3": tf.Phi3Config(
            **gqa, partial_rotary_factor=0.5, pad_token_id=None, bos_token_id=None, eos_token_id=None
        ),
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
    with (
        torch.no_grad()
    ):  # norm weights far from their init (Gemma's start at 0, so 1 + 0 would hide its form)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.5, 0.5)
    return model


# Every rope type transformers 5 ships, on the tiny Llama. The original context is small (64 positions, 48 for
# longrope), so that a stream of a few hundred tokens passes it, and dynamic and longrope would change their
# frequencies if the cache ever handed the model a position that far.
_HALF = 8  # head dim 16 / 2
ROPE_VARIANTS = {
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    ),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, attention_factor=1.3),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "longrope": dict(
        rope_type="longrope",
        short_factor=[1.0 + 0.1 * i for i in range(_HALF)],
        long_factor=[2.0 + 0.3 * i for i in range(_HALF)],
        original_max_position_embeddings=48,
    ),
    "proportional": dict(rope_type="proportional", partial_rotary_factor=0.5),
}


def tiny_rope_model(rope: str, seed: int = 0):
    torch.manual_seed(seed)
    params = dict(ROPE_VARIANTS[rope], rope_theta=10000.0)
    max_positions = 256 if rope == "longrope" else 64
    config = tf.LlamaConfig(
        **dict(COMMON, max_position_embeddings=max_positions),
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters=params,
    )
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _family_configs():
    # pad/bos/eos ids of the released configs lie outside the tiny vocabulary
    base = dict(COMMON, num_attention_heads=4, num_key_value_heads=2, pad_token_id=None, bos_token_id=None)
    base["eos_token_id"] = None
    four = dict(base, num_hidden_layers=4)
    return {
        # a small cap, so the tanh is far from linear on the tiny model's logits
        "gemma2": tf.Gemma2Config(**four, head_dim=16, sliding_window=12, attn_logit_softcapping=2.0),
        "phi3": tf.Phi3Config(**base),
        "smollm3": tf.SmolLM3Config(**four, no_rope_layers=[1, 0, 1, 0]),
        "olmo2": tf.Olmo2Config(**base),
        "olmo3": tf.Olmo3Config(**four, sliding_window=12),
        "granite": tf.GraniteConfig(
            **base,
            attention_multiplier=0.3,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            logits_scaling=4.0,
        ),
        "ministral": tf.MinistralConfig(
            **four, head_dim=16, sliding_window=12, layer_types=["sliding_attention", "full_attention"] * 2
        ),
        "starcoder2": tf.Starcoder2Config(**base),
        "cohere": tf.CohereConfig(**base),
        "cohere2": tf.Cohere2Config(**four, head_dim=16, sliding_window=12),
        "gpt_oss": tf.GptOssConfig(
            **four,
            head_dim=16,
            sliding_window=12,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
        "granite_swa": tf.GraniteSWAConfig(**four, sliding_window=12),
        "granitemoe_swa": tf.GraniteMoeSWAConfig(
            **four, sliding_window=12, num_local_experts=4, num_experts_per_tok=2
        ),
        "glm": tf.GlmConfig(**base, head_dim=16),
        "helium": tf.HeliumConfig(**base, head_dim=16),
    }


FAMILIES = list(_family_configs())


def tiny_family_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_family_configs()[name], dtype=torch.float32).eval()
    with (
        torch.no_grad()
    ):  # learned sink logits far from 0, so that leaving them out shows (gpt-oss, Granite SWA)
        for module in model.modules():
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.normal_(0.0, 2.0)
    return model
