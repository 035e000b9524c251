"""Text to tokens for a stream: a stream starts the way the model was trained to start.

Models trained to see a BOS token first (Gemma, the Llama 3 family) lean on it as their attention sink; fed raw
text without it, they lose the sink effect and much of their quality. So the first text of a stream starts with
BOS when the tokenizer adds one to what it encodes, and never twice (a chat template may write it already). BOS
is then the first token of the stream: the first of the ``num_sinks`` anchored tokens, not one more.
"""

from __future__ import annotations


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer adds BOS to the text it encodes, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer.encode("a", add_special_tokens=True)
    return [bos] if probe[:1] == [bos] else []


def encode(tokenizer, text: str, first: bool, bos: bool = True) -> list[int]:
    """``text`` as token ids, special-token text such as ``<bos>`` included. ``first``: the text starts a stream,
    so it starts with BOS when the tokenizer adds one (``bos=False`` turns that off)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return with_bos(tokenizer, ids) if first and bos else ids


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` starting with BOS when the tokenizer adds one, unless they already do."""
    prefix = bos_prefix(tokenizer)
    return ids if not prefix or ids[:1] == prefix else prefix + ids
