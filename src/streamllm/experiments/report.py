"""What every experiment writes into its output folder: ``NAME.csv``, ``NAME.md`` and ``NAME.png``."""

from __future__ import annotations

import csv
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..defaults import cpu_flags

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# /proc/cpuinfo flags -> how a figure names them, the best unit first: a machine is named by the first it has
ISA = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def machine() -> str:
    """One line naming where a figure came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    # "AMD EPYC" names several kinds of machine: the vector units that set the speed name the kind
    flags = cpu_flags()
    unit = next((name for flag, name in ISA if flag in flags), None)
    if unit:
        cpu += f" ({unit})"
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""

    def cell(x) -> str:
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """The outputs of one experiment run. ``write`` puts them in ``out`` atomically, file by file."""

    name: str
    title: str
    command: str
    csv_header: Sequence[str]
    csv_rows: Sequence[Sequence[Any]] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # Markdown blocks, in order
    figure: Figure | None = None

    def paths(self, out: Path) -> list[Path]:
        return [out / f"{self.name}.{ext}" for ext in ("csv", "md", "png")]

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        csv_path, md_path, png_path = self.paths(out)
        with _atomic(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.csv_header)
            writer.writerows(self.csv_rows)
        md = [f"## {self.title}", "", f"Command: `{self.command}`", "", f"Machine: {machine()}", ""]
        with _atomic(md_path, "w") as f:
            f.write("\n".join(md + [s + "\n" for s in self.sections]))
        if self.figure is not None:
            with _atomic(png_path, "wb") as f:
                self.figure.savefig(f, format="png", dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(self.figure)
        return [p for p in (csv_path, md_path, png_path) if p.exists()]


class _atomic:
    """Open ``path.tmp`` for writing and rename it over ``path`` only when the block succeeds."""

    def __init__(self, path: Path, mode: str, **kwargs):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, mode, **kwargs)

    def __enter__(self):
        return self.f

    def __exit__(self, exc_type, *rest):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (8, 4.5)):
    """A matplotlib figure drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)
