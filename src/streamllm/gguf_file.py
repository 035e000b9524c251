"""What a GGUF file holds, checked before transformers reads it, so that a file that cannot load is named with
the reason in one line: not a GGUF file, cut short, or a quantization the ``gguf`` package cannot dequantize.

transformers dequantizes every tensor of a GGUF file (through that package) into the dtype asked for, so any
mix of types the package reads loads; ``summary`` also says which types the file mixes.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded, with the reason."""


def summary(path: Path) -> dict[str, int]:
    """Check that every tensor of the GGUF file at ``path`` is whole and of a type that can be dequantized.
    -> {type name: count of tensors}, most frequent first."""
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as exc:
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(exc))
        if unknown:
            raise GGUFError(
                f"{path} holds a tensor of unknown quantization type {unknown.group(1)} (not one the installed "
                "gguf package knows)"
            ) from exc
        if "reshape" in str(exc):  # a tensor's data runs past the end of the file
            raise GGUFError(f"{path} is truncated: its tensors need more than its {size} bytes") from exc
        raise GGUFError(f"{path} is corrupt: {exc}") from exc
    except IndexError as exc:  # the header itself runs past the end of the file
        raise GGUFError(f"{path} is truncated: its header runs past its {size} bytes") from exc
    counts: Counter[str] = Counter()
    checked: set[object] = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind not in checked and tensor.data.dtype == np.uint8:  # a quantized type: try one block of it
            type_size = gguf.GGML_QUANT_SIZES[kind][1]
            try:
                gguf.quants.dequantize(np.asarray(tensor.data).reshape(-1)[:type_size].reshape(1, -1), kind)
            except NotImplementedError as exc:
                raise GGUFError(
                    f"{path}: tensor {tensor.name} is {kind.name}, a quantization that cannot be dequantized here"
                ) from exc
            checked.add(kind)
        counts[kind.name] += 1
    return dict(counts.most_common())
