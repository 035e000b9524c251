"""Training the three variants on the same data, steps and seed, resumably, in round-robin segments.

A run is a folder (``$STREAMLLM_HOME/pretrain/runs/NAME``) holding ``settings.json`` and, per variant, its
checkpoints (``step-N/``: the model as ``save_pretrained`` writes it, plus ``trainer.pt`` with the optimizer),
a ``LATEST`` file naming the newest, ``log.jsonl`` (loss per step) and ``share.jsonl`` (held-out loss and the
share of attention on the first tokens at every checkpoint). Variants take turns of ``segment`` steps, the one
furthest behind first, and every turn ends with a checkpoint: all three advance together, so partial results
compare like with like, and a killed run loses at most one turn.

Batches are a function of (seed, step) and the learning rate of the step alone, so a resumed run computes what
an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ...home import home
from . import data as data_mod
from . import model as model_mod

log = logging.getLogger(__name__)

PROBE_SEQUENCES = 4  # held-out sequences for the checkpoint probe (loss and attention shares)
PROBE_SKIP = 16  # queries this close to the start are left out of the shares


def runs_dir() -> Path:
    return home() / "pretrain" / "runs"


COMPUTE = ("float32", "bfloat16")


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run; saved as ``settings.json`` and read back on resume."""

    data: str  # the prepared token folder
    shape: model_mod.Shape = field(default_factory=model_mod.Shape)
    variants: tuple[str, ...] = model_mod.VARIANTS
    seq_len: int = 512
    batch_size: int = 16
    steps: int = 1200
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    segment: int = 50  # steps per turn; every turn ends with a checkpoint
    milestones: tuple[int, ...] = (50, 100, 200, 400, 800)  # checkpoints kept (weights only) besides the last
    # The matrix products of the forward and backward passes: "bfloat16" runs them under autocast (weights, their
    # gradients and the optimizer stay float32), about twice as fast where the CPU multiplies bfloat16 natively.
    compute: str = "float32"

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in model_mod.VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be among {', '.join(model_mod.VARIANTS)}, got {self.variants}")
        if self.compute not in COMPUTE:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE)}, got {self.compute!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"lr must be > 0 and weight decay >= 0, got {self.lr} and {self.weight_decay}")
        for name in ("seq_len", "batch_size", "steps", "segment"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        raw = json.loads(text)
        raw["shape"] = model_mod.Shape(**raw["shape"])
        raw["variants"], raw["betas"] = tuple(raw["variants"]), tuple(raw["betas"])
        raw["milestones"] = tuple(raw["milestones"])
        return cls(**raw)


def learning_rate(s: Settings, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def open_run(folder: Path, settings: Settings | None = None) -> Settings:
    """The settings of the run in ``folder``: read back if it exists (``settings`` must then match or be None),
    else saved from ``settings``."""
    path = folder / "settings.json"
    if path.exists():
        saved = Settings.from_json(path.read_text())
        if settings is not None and settings != saved:
            raise ValueError(f"{folder} was started with other settings; resume it without changing them")
        return saved
    if settings is None:
        raise FileNotFoundError(f"no run in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(settings.to_json())
    return settings


def latest(folder: Path, variant: str) -> Path | None:
    pointer = folder / variant / "LATEST"
    return folder / variant / pointer.read_text().strip() if pointer.exists() else None


def step_of(ckpt: Path) -> int:
    """The step a checkpoint folder (``step-N``) was saved at."""
    return int(ckpt.name.split("-")[1])


def steps_done(folder: Path, variant: str) -> int:
    ckpt = latest(folder, variant)
    return step_of(ckpt) if ckpt else 0


def kept_checkpoints(folder: Path, variant: str) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint a variant keeps (milestones and the newest), oldest first."""
    found = []
    for ckpt in (folder / variant).glob("step-*"):
        if ckpt.name.endswith(".tmp") or not (ckpt / "config.json").exists():
            continue
        found.append((step_of(ckpt), ckpt))
    return sorted(found)


def load_model(ckpt: Path):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model_mod.prepare(model)
    return model


def inputs(variant: str, x: torch.Tensor, sink_id: int) -> torch.Tensor:
    """What the model reads for text ``x`` (B, T): the sink-token variant gets ``<|sink|>`` first. (B, T[+1])"""
    if variant == "sink-token":
        return torch.cat([torch.full_like(x[:, :1], sink_id), x], dim=1)
    return x


def loss_of(model, variant: str, x: torch.Tensor, sink_id: int, probe: dict | None = None) -> torch.Tensor:
    """Mean NLL of text tokens 1..T-1 of ``x`` (B, T): the same targets for every variant."""
    ids = inputs(variant, x, sink_id)
    kwargs = {"probe": probe} if probe is not None else {}
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits  # (B, T[+1], V)
    first = ids.shape[1] - x.shape[1]  # 1 with a sink token: logits[:, 1] predicts x[:, 1]
    pred = logits[:, first : first + x.shape[1] - 1]  # (B, T-1, V)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), x[:, 1:].reshape(-1))


def _optimizer(model, s: Settings):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas)


def train(
    folder: Path,
    settings: Settings | None = None,
    max_turns: int | None = None,
    on_step: Callable[[str, int, float, float], None] | None = None,
) -> dict[str, int]:
    """Train every variant of the run in ``folder`` to ``settings.steps`` (or for ``max_turns`` turns), resuming
    from the checkpoints there. Returns the steps each variant has done."""
    s = open_run(folder, settings)
    tokens = data_mod.Tokens(Path(s.data))
    stream = tokens.stream("train")
    turns = 0
    while max_turns is None or turns < max_turns:
        done = {v: steps_done(folder, v) for v in s.variants}
        behind = [v for v in s.variants if done[v] < s.steps]
        if not behind:
            break
        variant = min(behind, key=lambda v: (done[v], s.variants.index(v)))
        _turn(folder, s, tokens, stream, variant, done[variant], on_step)
        turns += 1
    return {v: steps_done(folder, v) for v in s.variants}


def _turn(folder, s: Settings, tokens, stream, variant: str, start: int, on_step) -> None:
    ckpt = latest(folder, variant)
    if ckpt is None:
        model = model_mod.build(variant, s.shape, tokens.vocab_size, tokens.eot_id, tokens.sink_id, s.seed)
        optimizer = _optimizer(model, s)
        _probe(folder, s, tokens, variant, model, 0)
    else:
        model = load_model(ckpt)
        optimizer = _optimizer(model, s)
        optimizer.load_state_dict(torch.load(ckpt / "trainer.pt", weights_only=True)["optimizer"])
    model.train()
    end = min(s.steps, (start // s.segment + 1) * s.segment)
    (folder / variant).mkdir(parents=True, exist_ok=True)
    with _appending(folder / variant / "log.jsonl") as logf:
        for step in range(start, end):
            began = time.perf_counter()
            lr = learning_rate(s, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = data_mod.batch(stream, step, s.seed, s.batch_size, s.seq_len)  # (B, T)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.compute == "bfloat16"):
                loss = loss_of(model, variant, x, tokens.sink_id)
            loss.backward()
            loss_value = float(loss.detach())
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - began
            row = {"step": step + 1, "tokens": (step + 1) * s.tokens_per_step, "loss": round(loss_value, 5)}
            row |= {"lr": lr, "grad_norm": round(float(norm), 4), "seconds": round(seconds, 3)}
            logf.write(json.dumps(row) + "\n")
            logf.flush()
            if on_step:
                on_step(variant, step + 1, loss_value, s.tokens_per_step / seconds)
    model.eval()
    _save(folder, s, tokens, variant, model, optimizer, end)
    _probe(folder, s, tokens, variant, model, end)


def _appending(path: Path):
    """``path`` opened for appending lines; a line cut short by a killed run is ended first."""
    f = open(path, "a+")
    if f.tell():
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")
    return f


def _save(folder: Path, s: Settings, tokens, variant: str, model, optimizer, step: int) -> None:
    root = folder / variant
    target = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copy(tokens.tokenizer_path, tmp / "tokenizer.json")
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp / "trainer.pt")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    pointer = root / "LATEST.tmp"
    pointer.write_text(target.name)
    os.replace(pointer, root / "LATEST")
    for old in root.glob("step-*"):  # keep milestones' weights; only the newest keeps its optimizer
        if old == target or old.name.endswith(".tmp"):
            continue
        if step_of(old) in s.milestones:
            (old / "trainer.pt").unlink(missing_ok=True)
        else:
            shutil.rmtree(old)


def probe_batch(s: Settings, tokens) -> torch.Tensor:
    """Fixed held-out sequences (P, seq_len), evenly spread over the held-out stream."""
    held = tokens.stream("heldout")
    gap = (len(held) - s.seq_len) // PROBE_SEQUENCES
    return torch.stack(
        [
            torch.from_numpy(held[i * gap : i * gap + s.seq_len].astype("int64"))
            for i in range(PROBE_SEQUENCES)
        ]
    )


@torch.no_grad()
def probe(model, variant: str, x: torch.Tensor, sink_id: int) -> dict:
    """Held-out loss on ``x`` (P, T) and, per layer, the mean share of attention (over heads, sequences and
    queries past ``PROBE_SKIP``) on position 0, on position 1, and on the zero sink's column where there is one;
    ``pos0_heads`` and ``sink_heads`` give the first and the last of these per head (mean over sequences and
    queries), since a sink often lives in a few heads only."""
    probs: dict[int, torch.Tensor] = {}
    loss = loss_of(model, variant, x, sink_id, probe=probs)
    pos0: list[float] = []
    pos1: list[float] = []
    sink_column: list[float | None] = []
    pos0_heads: list[list[float]] = []
    sink_heads: list[list[float] | None] = []
    out = {"heldout_loss": round(float(loss), 5), "pos0": pos0, "pos1": pos1, "sink_column": sink_column}
    out |= {"pos0_heads": pos0_heads, "sink_heads": sink_heads}

    def per_head(share: torch.Tensor) -> list[float]:  # (P, H, T') -> H values
        return [round(float(v), 5) for v in share.mean(dim=(0, 2))]

    for layer in sorted(probs):
        p = probs[layer][:, :, PROBE_SKIP:]  # (P, H, T', K)
        T = p.shape[2] + PROBE_SKIP
        pos0.append(round(float(p[..., 0].mean()), 5))
        pos1.append(round(float(p[..., 1].mean()), 5))
        pos0_heads.append(per_head(p[..., 0]))
        extra = p.shape[-1] - T  # 1 for the zero sink's column
        sink_column.append(round(float(p[..., -1].mean()), 5) if extra else None)
        sink_heads.append(per_head(p[..., -1]) if extra else None)
    return out


def _probe(folder: Path, s: Settings, tokens, variant: str, model, step: int) -> None:
    model.eval()
    row = {"step": step, "tokens": step * s.tokens_per_step}
    row |= probe(model, variant, probe_batch(s, tokens), tokens.sink_id)
    (folder / variant).mkdir(parents=True, exist_ok=True)
    with _appending(folder / variant / "share.jsonl") as f:
        f.write(json.dumps(row) + "\n")
