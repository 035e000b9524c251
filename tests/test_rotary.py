import torch
from tiny import tiny_model
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply

from streamllm.backends.arch import shape_of
from streamllm.core.rotary import rotate


def _model_rotation(model, x, pos, apply):
    rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    cos, sin = rotary(x, torch.tensor([pos]))
    r = cos.shape[-1]
    q, _ = apply(x[..., :r], x[..., :r], cos, sin)
    return torch.cat([q, x[..., r:]], dim=-1)


def test_rotate_matches_the_models_own_rotary():
    for arch, apply in (("llama", llama_apply), ("gpt_neox", neox_apply)):
        model = tiny_model(arch)
        inv_freq = shape_of(model).inv_freqs[0]
        x = torch.randn(1, 2, 5, 16)
        pos = [0, 3, 17, 250, 1000]
        expected = _model_rotation(model, x, pos, apply)
        got = rotate(x, torch.tensor(pos), inv_freq)
        # The model computes angles in float32 (error ~ pos * 6e-8 rad); ours are float64.
        assert torch.allclose(got, expected, atol=2e-4), arch


def test_shifts_compose_and_invert():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    d = torch.tensor([5, 100, 4_000_000, -7])
    assert torch.allclose(rotate(rotate(x, d, inv_freq), -d, inv_freq), x, atol=1e-10)
    assert torch.allclose(rotate(rotate(x, d, inv_freq), d, inv_freq), rotate(x, 2 * d, inv_freq), atol=1e-9)
