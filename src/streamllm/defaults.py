"""The dtype and decode path a model runs when the user leaves them to streamllm ("auto", the default of every
command and of the server): the fastest path that stays faithful to the weights as they were published, on this
CPU. The rule comes from the side-by-side measurements in ``docs/performance.md`` ("Defaults"):

- **dtype**: bfloat16 where the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX on x86, the BF16
  extension on Arm); float32 elsewhere, where bfloat16 would be converted in software and run slower.
- **decode**: ``int4`` where the published weights are 4-bit and the 4-bit step measured faster: the built-ins
  say so each, per dtype (``BuiltinModel.decode``: Gemma-3-270m, whose file keeps only some matrices in 4 bits,
  decodes faster on its exact step in bfloat16 and on the 4-bit one in float32), and a GGUF file qualifies when at least ``INT4_SHARE`` of its matrix
  weights are in a 4-bit type the step keeps as they are. Then the step multiplies by the published weights
  themselves, not an approximation of them. ``fast`` otherwise: exact, on the model's own weights.
- ``--exact`` asks for float32 and the fast path: the reference, exact against transformers' float32 forward.

Any explicit ``--dtype`` or ``--decode`` wins over the rule. The ``Choice`` says what was chosen and why; the
commands print it with their figures (``--stats``, ``--json``, chat's ``/stats``, the server's ``/health``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

INT4_SHARE = 0.75  # the share of a GGUF file's matrix weights that must be 4-bit for int4 to be the default
FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")  # GGUF types the 4-bit step keeps exactly (``quant.Int4MatVec``)
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")  # /proc/cpuinfo flags (x86) and features (Arm)


@dataclass(frozen=True)
class Choice:
    dtype: str  # "float32" or "bfloat16"
    decode: str  # "fast", "int4" or "transformers"
    why: str  # how each was chosen, in a few words

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "decode": self.decode, "why": self.why}


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags, as /proc/cpuinfo names them (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(flags: set[str] | None = None) -> str | None:
    """The flag by which this CPU multiplies bfloat16 natively, or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in NATIVE_BF16 if f in flags), None)


def four_bit_share(gguf: Path) -> float:
    """The share of a GGUF file's matrix weights (2-D tensors, by element count) held in ``FOUR_BIT`` types."""
    import gguf as gg

    total = four = 0
    for tensor in gg.GGUFReader(gguf).tensors:
        if len(tensor.shape) < 2:
            continue
        n = int(tensor.n_elements)
        total += n
        four += n if tensor.tensor_type.name in FOUR_BIT else 0
    return four / total if total else 0.0


def choose(
    model: str,
    dtype: str | None = None,
    decode: str | None = None,
    exact: bool = False,
    flags: set[str] | None = None,
) -> Choice:
    """The path for ``model`` (a built-in name, a folder or a .gguf file): ``dtype`` and ``decode`` as given,
    else ("auto" or None) by the rule above. ``flags``: the CPU's (read from /proc/cpuinfo when None)."""
    from .models import BUILTINS

    why = []
    if exact:
        dtype = "float32" if dtype in (None, "auto") else dtype
        decode = "fast" if decode in (None, "auto") else decode
        why.append("--exact")
    if dtype in (None, "auto"):
        flag = native_bf16(flags)
        dtype = "bfloat16" if flag else "float32"
        why.append(f"auto: {flag} on this CPU" if flag else "auto: no native bfloat16 on this CPU")
    if decode in (None, "auto"):
        decode, reason = _decode_for(model, BUILTINS, dtype)
        why.append(f"auto: {reason}")
    return Choice(dtype, decode, "; ".join(why) or "as asked")


def _decode_for(model: str, builtins: dict, dtype: str) -> tuple[str, str]:
    if model in builtins:
        entry = builtins[model]
        decode = entry.decode.get(dtype, "fast")
        faster = "4-bit step" if decode == "int4" else "exact step"
        return decode, f"published in {entry.weights}, its {faster} measured faster in {dtype}"
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        try:
            share = four_bit_share(path)
        except Exception:  # an unreadable file is named by the loader, with its reason
            return "fast", "exact weights"
        if share >= INT4_SHARE:
            return "int4", f"{share:.0%} of its matrix weights are 4-bit"
        return "fast", f"only {share:.0%} of its matrix weights are 4-bit"
    return "fast", "exact weights"
