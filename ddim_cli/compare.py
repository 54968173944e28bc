"""The DDPM-vs-DDIM experiment of the DDIM paper: the same noise through several samplers.

Every row starts from the same x_T, the same classes (for a class-conditional model, drawn per
image from its seed as ``ddim sample`` does, unless given) and, for stochastic samplers, the same
noise stream, so the differences between rows are the samplers'. Results are a labelled grid, a table (Markdown and
CSV; one dict per row, so further columns such as FID slot in) and a plot of time against steps.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ddim_cli.checkpoint import CheckpointError
from ddim_cli.distributed import Shard
from ddim_cli.fid import frechet_distance, source_batches, statistics
from ddim_cli.images import load_images, save_labelled_rows, save_pngs
from ddim_cli.jobs.sample import generate
from ddim_cli.models import LoadedModel, MakeEps, SamplerSpec, class_labels
from ddim_cli.outputs import write_text_whole, written_whole
from ddim_cli.seeding import seeded_noise

# The DDIM paper's Table 1 (FID of 50k samples; rows eta = 0, 0.2, 0.5, 1 and sigma-hat, i.e. DDPM
# with variance beta; columns S = 10, 20, 50, 100, 1000). The CelebA sigma-hat row is not included.
_S = (10, 20, 50, 100, 1000)
PAPER_FID: dict[str, dict[tuple[str, int], float]] = {
    "cifar10": {
        **dict(zip([("0", s) for s in _S], (13.36, 6.84, 4.67, 4.16, 4.04), strict=True)),
        **dict(zip([("0.2", s) for s in _S], (14.04, 7.11, 4.77, 4.25, 4.09), strict=True)),
        **dict(zip([("0.5", s) for s in _S], (16.66, 8.35, 5.25, 4.46, 4.29), strict=True)),
        **dict(zip([("1", s) for s in _S], (41.07, 18.36, 8.01, 5.78, 4.73), strict=True)),
        **dict(zip([("sigma-hat", s) for s in _S], (367.43, 133.37, 32.72, 9.99, 3.17), strict=True)),
    },
    "celeba": {
        **dict(zip([("0", s) for s in _S], (17.33, 13.73, 9.17, 6.53, 3.51), strict=True)),
        **dict(zip([("0.2", s) for s in _S], (17.66, 14.11, 9.51, 6.79, 3.64), strict=True)),
        **dict(zip([("0.5", s) for s in _S], (19.86, 16.06, 11.01, 8.09, 4.28), strict=True)),
        **dict(zip([("1", s) for s in _S], (33.12, 26.03, 18.48, 13.93, 5.98), strict=True)),
    },
}


def paper_fid(preset: str, spec: SamplerSpec) -> float | None:
    """The paper's FID for this sampler on a model of the ``preset`` (run) name, if it reports one."""
    if spec.method == "dpm++2m":
        return None  # not in the DDIM paper
    if spec.method == "ddpm":
        key = "sigma-hat" if spec.variance == "beta" else "1"  # posterior-variance DDPM is eta = 1
    else:
        key = f"{spec.eta:g}"
    return PAPER_FID.get(preset, {}).get((key, spec.steps))


@dataclass
class CompareRow:
    spec: SamplerSpec
    images: torch.Tensor  # the first images, for the grid
    seconds_per_image: float
    fid: float | None = None
    paper_fid: float | None = None
    model: str = ""  # "teacher" or "student" when a distilled student is compared with its teacher

    @property
    def label(self) -> str:
        return f"{self.model} {self.spec.label}".strip()

    @property
    def slug(self) -> str:
        return f"{self.model}-{self.spec.slug}" if self.model else self.spec.slug

    def record(self, with_fid: bool, with_paper: bool) -> dict[str, object]:
        record: dict[str, object] = {"model": self.model} if self.model else {}
        record |= {
            "sampler": self.spec.method + (f" ({self.spec.variance} variance)" if self.spec.method == "ddpm" else ""),
            "steps": self.spec.steps,
            "eta": f"{self.spec.eta:g}" if self.spec.method == "ddim" else "",
            "seconds_per_image": round(self.seconds_per_image, 6),
        }
        if with_fid:
            record["fid"] = "" if self.fid is None else round(self.fid, 3)
        if with_paper:
            record["paper_fid"] = "" if self.paper_fid is None else self.paper_fid
        return record


def comparison_specs(
    steps: list[int],
    etas: list[float],
    *,
    skip: str,
    clip_x0: bool,
    ddpm_reference: int | None,
    dpm_solver: bool = True,
) -> list[SamplerSpec]:
    """DDIM for every (eta, steps) pair, DPM-Solver++(2M) for every step count (logsnr spacing),
    then DDPM over all ``ddpm_reference`` steps if given."""
    specs = [SamplerSpec("ddim", s, eta, skip, clip_x0=clip_x0) for eta in etas for s in steps]
    if dpm_solver:
        specs += [SamplerSpec("dpm++2m", s, 0.0, "logsnr", clip_x0=clip_x0) for s in steps]
    if ddpm_reference:  # DDPM's own sampler for its CIFAR-10 result: sigma^2 = beta (the paper's sigma-hat)
        specs.append(SamplerSpec("ddpm", ddpm_reference, 0.0, "uniform", variance="beta", clip_x0=clip_x0))
    return specs


def student_step_counts(student: LoadedModel, wanted: list[int]) -> list[int]:
    """The step counts to compare a distilled student at: those of ``wanted`` it serves, else all
    it serves (a progressive run: its kept rounds; a consistency student: its grid's counts)."""
    from ddim_cli.models import kept_students, student_for_steps

    distilled = student.config.distill
    if distilled.method == "progressive":
        served = sorted(kept_students(student.run_dir)) or [distilled.steps]
    else:
        served = []
        for count in sorted(set(wanted) | {distilled.steps}):
            try:
                student_for_steps(student, count)
                served.append(count)
            except CheckpointError:
                continue
    chosen = [count for count in served if count in wanted]
    return chosen or served


def teacher_and_student_specs(
    student: LoadedModel, teacher: LoadedModel, counts: list[int], *, dpm_solver: bool, clip_x0: bool | None
) -> tuple[list[SamplerSpec], list[str]]:
    """Rows comparing a student with its teacher at each step count: the teacher's DDIM (eta 0,
    its spacing) and DPM-Solver++(2M), then the student's own sampler; and whose each row is."""
    cfg = teacher.config.sample
    clip = cfg.clip_x0 if clip_x0 is None else clip_x0
    own = student.config.distill.sampler
    specs, roles = [], []
    for count in counts:
        specs.append(SamplerSpec("ddim", count, 0.0, cfg.skip, clip_x0=clip))
        roles.append("teacher")
        if dpm_solver and count > 1:
            specs.append(SamplerSpec("dpm++2m", count, 0.0, "logsnr", clip_x0=clip))
            roles.append("teacher")
        specs.append(
            SamplerSpec(own, count, 0.0, student.config.distill.spacing, clip_x0=student.config.sample.clip_x0)
        )
        roles.append("student")
    return specs, roles


DEFAULT_ETAS = (0.0, 0.5, 1.0)  # deterministic DDIM, halfway, and DDPM-like (the paper's Table 1)


def plan_comparison(
    loaded: LoadedModel,
    steps: list[int],
    etas: list[float] | None = None,
    *,
    teacher: LoadedModel | None = None,
    skip: str | None = None,
    clip_x0: bool | None = None,
    ddpm_reference: bool = True,
    dpm_solver: bool = True,
) -> tuple[list[SamplerSpec], list[str] | None]:
    """The rows ``ddim compare`` samples, checked against the schedule, and whose each row is (None:
    all the model's). A model: :func:`comparison_specs` (``skip`` and ``clip_x0`` default to its
    config's; the DDPM reference over all its training steps; ``etas`` None: :data:`DEFAULT_ETAS`).
    A distilled student with its ``teacher``: :func:`teacher_and_student_specs` at the counts of
    ``steps`` it serves; ``etas`` and ``skip`` are refused there (a ValueError), not ignored."""
    if teacher is not None:
        for option, given in (("--eta", etas), ("--skip", skip)):
            if given is not None:
                raise ValueError(
                    f"{option}: a student is compared on its own grid, with its teacher's deterministic DDIM "
                    f"(eta 0) beside it; drop {option}"
                )
        counts = student_step_counts(loaded, steps)
        specs, roles = teacher_and_student_specs(loaded, teacher, counts, dpm_solver=dpm_solver, clip_x0=clip_x0)
    else:
        cfg = loaded.config
        specs, roles = (
            comparison_specs(
                steps,
                list(DEFAULT_ETAS if etas is None else etas),
                skip=cfg.sample.skip if skip is None else skip,
                clip_x0=cfg.sample.clip_x0 if clip_x0 is None else clip_x0,
                ddpm_reference=cfg.diffusion.num_timesteps if ddpm_reference else None,
                dpm_solver=dpm_solver,
            ),
            None,
        )
    for spec in specs:
        spec.check(loaded.alpha_bars)
    return specs, roles


def row_models(
    student: LoadedModel,
    teacher: LoadedModel,
    specs: list[SamplerSpec],
    roles: list[str],
    noise_model_of: Callable[[LoadedModel, float], MakeEps],
    unconditional: bool = False,
) -> list[tuple[str, LoadedModel, MakeEps]]:
    """Each row's (name, model, noise model) for :func:`run_comparison` when a student meets its
    teacher: the teacher guided at its config's guidance (unless ``unconditional``), the student
    for the row's step count unguided (it learnt its teacher's guidance). ``noise_model_of(model,
    w)`` builds a noise model as the job runs it."""
    from ddim_cli.models import student_for_steps

    guided = teacher.config.model.num_classes is not None and not unconditional
    teacher_eps = noise_model_of(teacher, teacher.config.sample.guidance if guided else 0.0)
    rows = []
    for spec, role in zip(specs, roles, strict=True):
        if role == "teacher":
            rows.append(("teacher", teacher, teacher_eps))
        else:
            model = student_for_steps(student, spec.steps)
            rows.append(("student", model, noise_model_of(model, 0.0)))
    return rows


def run_comparison(
    loaded: LoadedModel,
    make_eps: MakeEps,
    specs: list[SamplerSpec],
    *,
    n: int,
    seed: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    samples_dir: Path | None = None,
    count: int | None = None,
    classes: list[int] | None = None,
    unconditional: bool = False,
    shard: Shard | None = None,
    models: list[tuple[str, LoadedModel, MakeEps]] | None = None,
) -> list[CompareRow]:
    """Sample ``n`` images per row; with ``samples_dir``, ``count`` images per row are kept there as
    PNGs (for FID) and images already there are reused, so an interrupted run picks up where it was.
    With a ``shard`` (torchrun) the ranks share every batch and rank 0 writes the PNGs. ``models``
    gives each row its own (name, model, noise model), e.g. a distilled student and its teacher."""
    shard = shard or Shard()
    models = models or [("", loaded, make_eps)] * len(specs)
    for _, model, model_eps in {id(m[1]): m for m in models}.values():
        _warm_up(model, model_eps, min(batch_size, max(n, count or 0)))  # one-time set-up is no row's cost
    rows = []
    for spec, (name, loaded, make_eps) in zip(specs, models, strict=True):
        row = CompareRow(spec, torch.empty(0), 0.0, model=name)
        if samples_dir is None:  # images 0..n-1, the same x_T, classes and noise for every row
            images, seconds = sample_images(
                loaded, make_eps, spec, seed, 0, n, batch_size, progress, classes, unconditional, shard
            )
        else:
            folder = samples_dir / row.slug
            seconds = fill_sample_folder(
                loaded,
                make_eps,
                spec,
                folder,
                max(count or 0, n),
                seed,
                batch_size,
                progress,
                classes,
                unconditional,
                shard=shard,
            )
            shard.barrier()  # rank 0 has written the folder
            images = load_images(
                sorted(folder.glob("*.png"))[:n], loaded.config.data.image_size, loaded.config.data.channels
            )[0]
        row.images, row.seconds_per_image = images, seconds
        rows.append(row)
    return rows


def sample_images(
    loaded: LoadedModel,
    make_eps: MakeEps,
    spec: SamplerSpec,
    seed: int,
    start: int,
    stop: int,
    batch_size: int,
    progress: Callable[[int], None] | None,
    classes: list[int] | None,
    unconditional: bool,
    shard: Shard,
) -> tuple[torch.Tensor, float]:
    """Images ``start .. stop - 1`` of ``spec`` (image i from seed + i, its class drawn or cycled as
    ``ddim sample`` does) and the seconds per image."""
    x_T, generators = seeded_noise(loaded.image_shape, list(range(seed + start, seed + stop)))
    labels = class_labels(loaded, generators, classes=classes, unconditional=unconditional, first_index=start)
    return generate(
        loaded, make_eps, spec, x_T, generators, labels=labels, batch_size=batch_size, progress=progress, shard=shard
    )


def fill_sample_folder(
    loaded: LoadedModel,
    make_eps: MakeEps,
    spec: SamplerSpec,
    folder: Path,
    count: int,
    seed: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    classes: list[int] | None = None,
    unconditional: bool = False,
    shard: Shard | None = None,
) -> float:
    """Make ``folder`` hold images 0..count-1 of ``spec`` (image i from seed + i), reusing those
    already there; returns the seconds per image, measured now or when they were made. With a
    ``shard``, rank 0 reads and writes the folder and the ranks share every batch."""
    shard = shard or Shard()
    timing, done = {"images": 0, "seconds": 0.0}, 0
    timing_file = folder / "timing.json"
    if shard.main:
        folder.mkdir(parents=True, exist_ok=True)
        if timing_file.exists():
            timing = json.loads(timing_file.read_text())
        while (folder / f"{done:06d}.png").exists() and done < count:
            done += 1
    timing, done = shard.broadcast((timing, done))
    if progress is not None:
        progress(done * len(spec.timesteps(loaded.alpha_bars)))
    for start in range(done, count, batch_size):
        stop = min(count, start + batch_size)
        images, seconds = sample_images(
            loaded, make_eps, spec, seed, start, stop, batch_size, progress, classes, unconditional, shard
        )
        timing = {"images": timing["images"] + len(images), "seconds": timing["seconds"] + seconds * len(images)}
        if shard.main:
            save_pngs(images, folder, first_index=start)
            write_text_whole(timing_file, json.dumps(timing))
    return timing["seconds"] / max(timing["images"], 1)


def add_fid(
    rows: list[CompareRow],
    samples_dir: Path,
    reference,
    extract,
    batch_size: int,
    preset: str,
    shard: Shard | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Fill in each row's FID against ``reference`` statistics, and the paper's where it has one
    (with a ``shard``, the ranks share the feature extraction)."""
    for row in rows:
        batches = source_batches(samples_dir / row.slug, batch_size)
        row.fid = frechet_distance(statistics(batches, extract, progress=progress, shard=shard), reference)
        row.paper_fid = paper_fid(preset, row.spec)


def _warm_up(loaded: LoadedModel, make_eps: MakeEps, batch: int) -> None:
    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        x, t = (
            torch.zeros(batch, *loaded.image_shape, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )
        labels = None if loaded.config.model.num_classes is None else torch.zeros(batch, dtype=torch.long)
        make_eps(labels)(x, t)


def write_comparison(rows: list[CompareRow], out_dir: Path) -> dict[str, Path]:
    """Write ``grid.png``, ``table.md``, ``table.csv`` and ``time_vs_steps.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("grid.png", "table.md", "table.csv", "time_vs_steps.png")}
    save_labelled_rows([(row.label, row.images) for row in rows], paths["grid.png"])
    with_fid = any(row.fid is not None for row in rows)
    with_paper = any(row.paper_fid is not None for row in rows)
    records = [row.record(with_fid, with_paper) for row in rows]
    columns = list(records[0])
    with written_whole(paths["table.csv"]) as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(record[c]) for c in columns) + " |" for record in records]
    write_text_whole(paths["table.md"], "\n".join(lines) + "\n")
    _plot(rows, paths["time_vs_steps.png"], lambda row: row.seconds_per_image, "seconds per image")
    if with_fid:
        paths["fid_vs_steps.png"] = out_dir / "fid_vs_steps.png"
        _plot(rows, paths["fid_vs_steps.png"], lambda row: row.fid, "FID")
        paths["fid_table.md"] = out_dir / "fid_table.md"
        write_text_whole(paths["fid_table.md"], _paper_layout(rows))
    return paths


def _paper_layout(rows: list[CompareRow]) -> str:
    """FID laid out as the DDIM paper's Table 1: one row per eta (and DDPM), one column per S;
    each cell is ours, with the paper's value in parentheses where it reports one."""
    steps = sorted({row.spec.steps for row in rows})

    def line_of(name: str, members: list[CompareRow]) -> str:
        by_steps = {row.spec.steps: row for row in members}
        cells = []
        for s in steps:
            row = by_steps.get(s)
            text = "" if row is None or row.fid is None else f"{row.fid:.2f}"
            if row is not None and row.paper_fid is not None:
                text += f" ({row.paper_fid:g})"
            cells.append(text)
        return f"| {name} | " + " | ".join(cells) + " |"

    lines = ["| FID | " + " | ".join(f"S={s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for model in dict.fromkeys(row.model for row in rows):
        mine = [r for r in rows if r.model == model]
        prefix = f"{model} " if model else ""
        etas = sorted({row.spec.eta for row in mine if row.spec.method == "ddim"})
        lines += [
            line_of(f"{prefix}eta={eta:g}", [r for r in mine if r.spec.method == "ddim" and r.spec.eta == eta])
            for eta in etas
        ]
        for method in ("dpm++2m", "consistency"):
            if members := [r for r in mine if r.spec.method == method]:
                lines.append(line_of(prefix + method, members))
    ddpm = [r for r in rows if r.spec.method == "ddpm"]
    if ddpm:
        lines.append(line_of(ddpm[0].spec.label.split(" S=")[0] + f" ({ddpm[0].spec.variance} variance)", ddpm))
    return "\n".join(lines) + "\n"


def _plot(rows: list[CompareRow], path: Path, value: Callable[[CompareRow], float], label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for model in dict.fromkeys(row.model for row in rows):
        mine, prefix = [r for r in rows if r.model == model], f"{model} " if model else ""
        for eta in sorted({row.spec.eta for row in mine if row.spec.method == "ddim"}):
            series = sorted((r.spec.steps, value(r)) for r in mine if r.spec.method == "ddim" and r.spec.eta == eta)
            axes.plot(*zip(*series, strict=True), marker="o", label=f"{prefix}ddim eta={eta:g}")
        for method, marker in (("dpm++2m", "^"), ("consistency", "v")):
            if series := sorted((r.spec.steps, value(r)) for r in mine if r.spec.method == method):
                axes.plot(*zip(*series, strict=True), marker=marker, label=prefix + method)
    for row in rows:
        if row.spec.method == "ddpm":
            axes.plot([row.spec.steps], [value(row)], marker="s", linestyle="", label=row.spec.label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("sampling steps (model evaluations)")
    axes.set_ylabel(label)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with written_whole(path) as partial:
        figure.savefig(partial, format="png")
    plt.close(figure)
