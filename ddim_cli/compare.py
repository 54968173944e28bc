"""The DDPM-vs-DDIM experiment of the DDIM paper: the same noise through several samplers.

Every row starts from the same x_T (and, for stochastic samplers, the same noise stream), so the
differences between rows are the samplers'. Results are a labelled grid, a table (Markdown and
CSV; one dict per row, so further columns such as FID slot in) and a plot of time against steps.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ddim_cli.generate import LoadedModel, SamplerSpec, generate, seeded_noise
from ddim_cli.images import save_labelled_rows
from ddim_cli.sampling import EpsModel


@dataclass
class CompareRow:
    spec: SamplerSpec
    images: torch.Tensor
    seconds_per_image: float

    def record(self) -> dict[str, object]:
        return {
            "sampler": self.spec.method,
            "steps": self.spec.steps,
            "eta": self.spec.eta if self.spec.method == "ddim" else "",
            "seconds_per_image": round(self.seconds_per_image, 6),
        }


def comparison_specs(
    steps: list[int], etas: list[float], *, skip: str, clip_x0: bool, ddpm_reference: int | None
) -> list[SamplerSpec]:
    """DDIM for every (eta, steps) pair, then DDPM over all ``ddpm_reference`` steps if given."""
    specs = [SamplerSpec("ddim", s, eta, skip, clip_x0=clip_x0) for eta in etas for s in steps]
    if ddpm_reference:
        specs.append(SamplerSpec("ddpm", ddpm_reference, 0.0, "uniform", clip_x0=clip_x0))
    return specs


def run_comparison(
    loaded: LoadedModel,
    make_eps: Callable[[int], EpsModel],
    specs: list[SamplerSpec],
    *,
    n: int,
    seed: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[CompareRow]:
    _warm_up(loaded, make_eps)  # one-time kernel set-up must not be billed to the first row
    rows = []
    for spec in specs:
        x_T, generators = seeded_noise(loaded.image_shape, list(range(seed, seed + n)))  # the same for every row
        images, seconds = generate(loaded, make_eps, spec, x_T, generators, batch_size=batch_size, progress=progress)
        rows.append(CompareRow(spec, images, seconds))
    return rows


def _warm_up(loaded: LoadedModel, make_eps: Callable[[int], EpsModel]) -> None:
    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        make_eps(1)(torch.zeros(1, *loaded.image_shape, device=device), torch.zeros(1, dtype=torch.long, device=device))


def write_comparison(rows: list[CompareRow], out_dir: Path) -> dict[str, Path]:
    """Write ``grid.png``, ``table.md``, ``table.csv`` and ``time_vs_steps.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("grid.png", "table.md", "table.csv", "time_vs_steps.png")}
    save_labelled_rows([(row.spec.label, row.images) for row in rows], paths["grid.png"])
    records = [row.record() for row in rows]
    columns = list(records[0])
    with open(paths["table.csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(record[c]) for c in columns) + " |" for record in records]
    paths["table.md"].write_text("\n".join(lines) + "\n")
    _plot_time(rows, paths["time_vs_steps.png"])
    return paths


def _plot_time(rows: list[CompareRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for eta in sorted({row.spec.eta for row in rows if row.spec.method == "ddim"}):
        series = sorted(
            (r.spec.steps, r.seconds_per_image) for r in rows if r.spec.method == "ddim" and r.spec.eta == eta
        )
        axes.plot(*zip(*series, strict=True), marker="o", label=f"ddim eta={eta:g}")
    for row in rows:
        if row.spec.method == "ddpm":
            axes.plot([row.spec.steps], [row.seconds_per_image], marker="s", linestyle="", label=row.spec.label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("sampling steps (model evaluations)")
    axes.set_ylabel("seconds per image")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
