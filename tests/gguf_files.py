"""GGUF files as people have them, written here from a model's weights: F32, Q8_0, Q6_K, and the K-quant mixes
Q4_K_M and Q5_K_M (4 or 5 bits for most matrices; 6 for the token embedding and for the value and down
projections of some layers, as llama.cpp mixes them). The K-quant layouts are packed with a plain search of each
group's step, which is all the tests need: the ``gguf`` package's own dequantizers read them back, and the tests
compare what transformers loads from them with the model they were written from.

Letters: n blocks of 256 weights (Q8_0: of 32), N rows, K inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

QK = 256  # weights per K-quant super-block


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and minima per block (n, 8) each -> the 12 bytes (n, 12) that Q4_K and Q5_K store."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([low, mid, high], axis=1)


def _nibbles(q: np.ndarray, width: int) -> np.ndarray:
    """4-bit values q (n, 256) packed two to a byte as the K-quants lay them out: in each run of 2 * ``width``
    values, the first ``width`` go to the low nibbles of ``width`` bytes and the next ``width`` to their high
    nibbles. -> (n, 128) uint8"""
    q = q.reshape(q.shape[0], -1, 2, width)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _affine_k(x: np.ndarray, levels: int):
    """Q4_K and Q5_K: blocks x (n, 256) as 8 groups of 32 on grids ``d*sc*q - dmin*m``. Like llama.cpp, each
    group's step is searched between its span / (levels - 1) and its span / (levels + 1) for the least squared
    error, so a group need not use the ends of its grid.
    -> (d, dmin as float16 (n, 1), sc, m (n, 8), q (n, 8, 32))"""
    g = x.reshape(-1, 8, 32)
    low = np.minimum(g.min(-1), 0)  # (n, 8): the format's offset is never positive
    span = np.maximum(g.max(-1) - low, 1e-12)  # (n, 8)
    best, scale = np.full(low.shape, np.inf), span / levels
    for i in range(21):
        step = span / (levels - 1 + 0.1 * i)  # (n, 8)
        q = np.clip(np.round((g - low[..., None]) / step[..., None]), 0, levels)
        err = ((q * step[..., None] + low[..., None] - g) ** 2).sum(-1)
        scale, best = np.where(err < best, step, scale), np.minimum(err, best)
    d = _f16(scale.max(-1, keepdims=True) / 63)  # (n, 1)
    dmin = _f16((-low).max(-1, keepdims=True) / 63)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d32 > 0, d32, 1)), 0, 63)  # (n, 8)
    m = np.clip(np.round(-low / np.where(dmin32 > 0, dmin32, 1)), 0, 63)
    step = (d32 * sc)[..., None]  # (n, 8, 1)
    q = np.clip(np.round((g + (dmin32 * m)[..., None]) / np.where(step > 0, step, 1)), 0, levels)
    return d, dmin, sc, m, q.astype(np.uint8)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_k(x, 15)
    qs = _nibbles(q, 32)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _pack_scales(sc, m), qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_k(x, 31)
    qs = _nibbles(q & 0xF, 32)
    bits = (q >> 4).astype(np.uint8)  # (n, 8, 32): the fifth bit of group j goes to bit j of qh
    qh = np.bitwise_or.reduce(bits << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)  # (n, 32)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _pack_scales(sc, m), qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    g = x.reshape(n, 16, 16)
    scale = np.abs(g).max(-1) / 31  # (n, 16)
    d = _f16(scale.max(-1, keepdims=True) / 127)  # (n, 1)
    d32 = d.astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d32 > 0, d32, 1)), -128, 127)  # (n, 16)
    step = (d32 * sc)[..., None]
    q = np.clip(np.round(g / np.where(step > 0, step, 1)), -32, 31).astype(np.int16) + 32  # (n, 16, 16)
    q = q.astype(np.uint8).reshape(n, 256)
    ql = _nibbles(q & 0xF, 64)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = np.bitwise_or.reduce(high << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    return np.concatenate(
        [ql, qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8), d.view(np.uint8)], axis=1
    )


PACKERS = {Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


def encode(weight: np.ndarray, qtype: Q) -> np.ndarray:
    """A float32 matrix (N, K) in ``qtype``'s bytes (N, bytes per row)."""
    if qtype == Q.F32:
        return weight.astype(np.float32)
    if qtype == Q.Q8_0:
        return gguf.quants.quantize(weight.astype(np.float32), qtype)
    N, K = weight.shape
    return PACKERS[qtype](weight.astype(np.float32).reshape(-1, QK)).reshape(N, -1)


# Which GGUF type each kind of matrix gets in each file type, as llama.cpp mixes them: "more bits" are the value
# and down projections of the even layers (llama.cpp picks a share of the layers), and the token embedding.
MIXES = {
    "F32": {"default": Q.F32, "norm": Q.F32},
    "Q8_0": {"default": Q.Q8_0, "norm": Q.F32},
    "Q6_K": {"default": Q.Q6_K, "norm": Q.F32},
    "Q5_K_M": {"default": Q.Q5_K, "more bits": Q.Q6_K, "norm": Q.F32},
    "Q4_K_M": {"default": Q.Q4_K, "more bits": Q.Q6_K, "norm": Q.F32},
}


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's order of the rotary dims in q and k (pairs interleaved), which its readers undo."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tokenizer(writer: gguf.GGUFWriter, folder: Path, size: int) -> None:
    """The byte-level BPE of the Hugging Face tokenizer in ``folder`` as GGUF metadata, cut to its first ``size``
    tokens (and the merges that make them from one another)."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < size}
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    merges = []
    for m in spec["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(f"{a} {b}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id)):
        if isinstance(config.get(key), str) and config[key] in vocab:
            add(vocab[config[key]])


def write_llama(model, tokenizer_folder: Path, path: Path, mix: str) -> dict[str, Q]:
    """Write a Llama ``model`` (tied embeddings) and the tokenizer in ``tokenizer_folder`` (cut to the model's
    vocabulary) as a GGUF file of the file type ``mix``; returns the type each tensor got."""
    c = model.config
    types = MIXES[mix]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    _tokenizer(writer, tokenizer_folder, c.vocab_size)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {
        "model.embed_tokens.weight": ("token_embd.weight", "more bits"),
        "model.norm.weight": ("output_norm.weight", "norm"),
    }
    parts = {
        "self_attn.q_proj": ("attn_q", "default"),
        "self_attn.k_proj": ("attn_k", "default"),
        "self_attn.o_proj": ("attn_output", "default"),
        "mlp.gate_proj": ("ffn_gate", "default"),
        "mlp.up_proj": ("ffn_up", "default"),
        "input_layernorm": ("attn_norm", "norm"),
        "post_attention_layernorm": ("ffn_norm", "norm"),
    }
    for i in range(c.num_hidden_layers):
        for hf, (name, kind) in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = (f"blk.{i}.{name}.weight", kind)
        more = "more bits" if i % 2 == 0 else "default"
        names[f"model.layers.{i}.self_attn.v_proj.weight"] = (f"blk.{i}.attn_v.weight", more)
        names[f"model.layers.{i}.mlp.down_proj.weight"] = (f"blk.{i}.ffn_down.weight", more)
    written = {}
    for key, (name, kind) in names.items():
        w = state[key]
        if name.endswith("attn_q.weight"):
            w = _permute(w, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = _permute(w, c.num_key_value_heads)
        qtype = types.get(kind, types["default"]) if w.dim() == 2 else types["norm"]
        data = encode(w.numpy(), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        written[name] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
