"""The quality gate: re-measure every figure README, docs/ and BENCHMARKS.md promise for the digits quickstart.

Runs the judges of eval_digits.py (sampling at 20/50/200 steps, --unconditional, --class k),
eval_inversion.py (plain, exact and null-text inversion of in-distribution and bilinear-upscaled
digits), eval_edits.py (DDIB, null-text and SDEdit edits) and eval_restore.py (inpainting, x4
super-resolution, denoising) on a trained quickstart run and, given `--students`, its distilled
students (each at its own step count, on the seeds of the teacher's 50-step figures), compares
every figure with the committed baseline (scripts/gate_baseline.json: each figure's value, which
way is better, its tolerance and, for the goals issues set, a hard limit), prints a table and
exits 1 if any figure regressed.

It takes 253 s on 2 idle cores of an AMD EPYC with AVX2, the slowest CPU it has met (2026-12-06, in
its two processes; 440 s before the expensive settings measured fewer images: 200-step sampling
100 samples, null-text inversion 10 and 20 digits, null-text edits 40, RePaint 50), and took 177-201
s on an AMD EPYC and 280-291 s on an Intel Xeon, both with AVX-512, with that larger work
(2026-12-05): too slow for CI; four students add about 20 s (the teacher's 50-step reference they are
divided by is the sampling group's). Run it after any change to
training, the U-Net, a sampler, a default or a config, on a freshly trained `bash
scripts/quickstart.sh`, and put what it printed in your note. The quickstart figures of README,
docs/ and BENCHMARKS.md come from its runs.

Usage:
  python scripts/eval_all.py runs/digits                        # all groups; exit 1 on a regression
  python scripts/eval_all.py runs/digits --groups inversion     # some of: sampling,inversion,edits,restoration
  python scripts/eval_all.py runs/digits --json figures.json    # also write the measured figures
  python scripts/eval_all.py runs/digits --groups distillation \
      --students runs/digits-dmd-S1,runs/digits-dmd-S2,runs/digits-dmd-S4,runs/digits-consistency-S4
      # the students of `ddim distill runs/digits --steps 1` (2, 4; --method consistency --steps 4)
  python scripts/eval_all.py --baseline-from a.json b.json c.json --about "why"
      # the baseline from the figures of >= 3 quickstart trainings (different seeds, other CPUs)
  python scripts/eval_all.py --baseline-from a.json b.json c.json --keep-runs-except 'S200|null-text' --about ..
      # the same, counting the current baseline's trainings too for the figures measured as before

A baseline figure is the mean of its trainings' values (geometric for ratio figures) and its
tolerance is 3 standard deviations of them (of their logarithms for ratio figures), at least the
figure's floor: what one measurement's own noise allows (the n = 500 sampling rates carry about
+-0.016 of seed noise; a max over 40 images more), so that a retrain on another CPU passes
unless something regressed. Issues' goals stay as hard limits. A baseline made from runs of some
groups (e.g. `--groups distillation`) keeps the current baseline's figures of the others.

A student's figures (`distill.dmd-S1....`): confident and PCA-FD of 500 samples from seeds 0..499,
`fd_to_teacher` (that PCA-FD over the teacher's at 50 DDIM steps on the same seeds, measured in the
same run), in class with `--class k` (50 per class) and, with the null label, confident and class
balance. Their baseline comes from students distilled with different training seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BASELINE = Path(__file__).with_name("gate_baseline.json")
GROUPS = ("sampling", "inversion", "edits", "restoration", "distillation")
TEACHER_REFERENCE = "sampling/default/S50"  # what a student's fd_to_teacher divides by

# Each figure's floor, by its last name part: (better, kind, amount). "slack" is an absolute change,
# "factor" a ratio; a baseline widens it to 3 standard deviations of its trainings' values.
FLOORS = {
    "confident": ("higher", "slack", 0.03),
    "in_class": ("higher", "slack", 0.02),
    "balance_tv": ("lower", "slack", 0.03),
    "pca_fd": ("lower", "factor", 1.35),
    "mean_mse": ("lower", "factor", 2.0),
    "max_mse": ("lower", "factor", 3.0),
    "calls_per_step": ("lower", "slack", 1.0),
    "missed": ("lower", "slack", 2),
    "to_target": ("higher", "slack", 0.05),
    "mse_source": ("lower", "factor", 1.25),
    "psnr": ("higher", "slack", 0.5),
    "read": ("higher", "slack", 0.05),
    "obs_rmse": ("lower", "slack", 1e-6),  # noiseless observations are kept to float rounding
    "fd_to_teacher": ("lower", "factor", 1.35),  # the student's PCA-FD's own noise; the teacher's is shared
}
SPREAD = 3.0  # standard deviations of the trainings' values a figure may move
MIN_RUNS = 3


# The sampling group's settings: (mode, steps, samples). 500 samples for the 50-step figures README
# promises; the 20- and 200-step figures are a check that more or fewer steps still work, and 200
# steps of 300 samples were half of the group's work.
SAMPLING = [
    ("default", 50, 500),
    ("unconditional", 50, 500),
    ("per-class", 50, 500),
    ("default", 20, 300),
    ("default", 200, 100),
]
SAMPLING_PARTS = {f"sampling/{mode}/S{steps}": (mode, steps, n) for mode, steps, n in SAMPLING}

# Each part's share of the gate's work, to split the parts evenly over parallel processes: seconds
# in a lane of the two-process gate (one thread each) on a 2-core AMD EPYC (AVX2), 2026-12-06.
PART_SECONDS = {
    "sampling/default/S50": 57,
    "sampling/unconditional/S50": 29,
    "sampling/per-class/S50": 56,
    "sampling/default/S20": 14,
    "sampling/default/S200": 46,
    "inversion/nearest": 65,
    "inversion/bilinear": 47,
    "edits": 75,
    "restoration": 101,
    "distillation": 15,  # four students at 1-4 steps: loading them is most of it
}


def parts_of(groups: list[str]) -> list[str]:
    """The gate's units of work for these groups: each sampling setting, inversion's two kinds of
    digits, and each other group whole; distillation needs the teacher's 50-step figures too."""
    subparts = {
        "sampling": list(SAMPLING_PARTS),
        "inversion": ["inversion/nearest", "inversion/bilinear"],
        "distillation": [TEACHER_REFERENCE, "distillation"],
    }
    parts = [part for group in groups for part in subparts.get(group, [group])]
    return list(dict.fromkeys(parts))  # the teacher's reference once


def lanes(groups: list[str], jobs: int) -> list[list[str]]:
    """The groups' parts split over ``jobs`` processes, longest first onto the least loaded."""
    parts = parts_of(groups)
    split: list[list[str]] = [[] for _ in range(min(jobs, len(parts)))]
    for part in sorted(parts, key=lambda p: -PART_SECONDS.get(p, 0)):
        min(split, key=lambda lane: sum(PART_SECONDS.get(p, 0) for p in lane)).append(part)
    return split


def measure_in_parallel(run: Path, groups: list[str], jobs: int, students: list[Path] = ()) -> dict[str, float]:
    """:func:`measure` with the parts shared among ``jobs`` processes that split the cores evenly
    (each set before torch loads, so that none waits on another's threads)."""
    _check_groups(groups, students)
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_use_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(measure_parts, run, lane, print, students) for lane in lanes(groups, jobs)]
        figures = {}
        for future in futures:
            figures.update(future.result())
    return _of_groups(figures, groups)


def _use_threads(threads: int) -> None:
    import os

    os.environ["OMP_NUM_THREADS"] = str(threads)  # ddim_cli keeps a user's OMP_NUM_THREADS


GROUP_OF_PREFIX = {  # a figure's name starts with its group's prefix
    "sample": "sampling",
    "invert": "inversion",
    "edit": "edits",
    "restore": "restoration",
    "distill": "distillation",
}


def _group_of(figure: str) -> str:
    return GROUP_OF_PREFIX[figure.split(".")[0]]


def _figure_order(figure: str) -> tuple[int, int]:
    """Groups in GROUPS' order, sampling settings in SAMPLING's."""
    settings = [f"sample.{mode}.S{steps}." for mode, steps, _ in SAMPLING]
    setting = next((i for i, prefix in enumerate(settings) if figure.startswith(prefix)), 0)
    return GROUPS.index(_group_of(figure)), setting


def measure(run: Path, groups: list[str], echo=print, students: list[Path] = ()) -> dict[str, float]:
    """Every figure of the chosen groups, by name (e.g. ``sample.default.S50.confident``);
    ``students``: the distillation group's run directories."""
    _check_groups(groups, students)
    return _of_groups(measure_parts(run, parts_of(groups), echo, students), groups)


def _check_groups(groups: list[str], students) -> None:
    if unknown := [g for g in groups if g not in GROUPS]:
        raise ValueError(f"unknown group {unknown[0]!r}; choose from {', '.join(GROUPS)}")
    if "distillation" in groups and not students:
        raise ValueError("the distillation group needs the students' run directories (--students)")


def _of_groups(figures: dict[str, float], groups: list[str]) -> dict[str, float]:
    """The figures of ``groups`` in the table's order, each student's fd_to_teacher added (the
    teacher's 50-step figures are measured for it even when the sampling group is not asked for)."""
    reference = figures.get("sample.default.S50.pca_fd")
    with_ratios = {}
    for name, value in figures.items():
        with_ratios[name] = value
        if name.startswith("distill.") and name.endswith(".default.pca_fd"):  # beside it in the table
            with_ratios[name.replace(".pca_fd", ".fd_to_teacher")] = value / reference
    chosen = [name for name in with_ratios if _group_of(name) in groups]
    return {name: with_ratios[name] for name in sorted(chosen, key=_figure_order)}


def measure_parts(run: Path, parts: list[str], echo=print, students: list[Path] = ()) -> dict[str, float]:
    """The figures of these parts (see :func:`parts_of`)."""
    from eval_digits import DigitJudge, sample_checkpoint, to_digit_scale
    from eval_edits import METHODS, edit_scores
    from eval_inversion import inversion_scores
    from eval_restore import SETTINGS, restore_scores

    from ddim_cli.models import load_model, resolve_checkpoint

    loaded = load_model(resolve_checkpoint(run)[0])
    judge = DigitJudge.cached()
    figures: dict[str, float] = {}
    for part in parts:
        start = time.perf_counter()
        if part in SAMPLING_PARTS:
            mode, steps, n = SAMPLING_PARTS[part]
            images, asked = sample_checkpoint(run, mode, steps, n, 0, None)
            scores = judge.score(to_digit_scale(images), asked)
            for key in ("confident", "pca_fd", "balance_tv", "in_class"):
                if key in scores and not (mode == "per-class" and key == "balance_tv"):
                    figures[f"sample.{mode}.S{steps}.{key}"] = scores[key]
        elif part.startswith("inversion/"):
            for row in inversion_scores(loaded, judge, kinds=[part.split("/")[1]]):
                for key in ("mean_mse", "max_mse", "calls_per_step", "missed"):
                    if key in row:
                        figures[f"invert.{_slug(row['name'])}.{key}"] = row[key]
        elif part == "edits":
            methods = [m for m in METHODS if "plain inversion" not in m]
            for row in edit_scores(loaded, judge, 100, 20, [loaded.config.sample.guidance], methods, yardstick=False):
                for key in ("to_target", "mse_source"):
                    figures[f"edit.{_slug(row['name'].rsplit(', w=', 1)[0])}.{key}"] = row[key]
        elif part == "restoration":
            for row in restore_scores(loaded, judge, 100, 50, ["inpaint", "sr4", "denoise0.3"], SETTINGS):
                if row["setting"].startswith(("ddnm", "repaint")):
                    noisy = row["task"].startswith("denoise")  # its observation error is the noise, by design
                    for key in ("psnr", "read") + (() if noisy else ("obs_rmse",)):
                        if row[key] is not None:
                            figures[f"restore.{row['task']}.{_slug(row['setting'])}.{key}"] = row[key]
        elif part == "distillation":
            figures.update(student_figures(run, students, judge))
        else:
            raise ValueError(f"unknown part {part!r}; the parts are {', '.join(parts_of(list(GROUPS)))}")
        echo(f"measured {part} in {time.perf_counter() - start:.0f} s", flush=True)
    return figures


def students_of(run: Path, students: list[Path]) -> list[tuple[str, object, object]]:
    """(figure prefix, the student loaded at its own step count, its sampler) for each student of
    ``run``'s teacher; ValueError, in one line, for anything else (checked before measuring)."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.models import SamplerSpec, load_model, resolve_checkpoint, student_for_steps

    try:
        teacher = load_model(resolve_checkpoint(run)[0]).checkpoint.resolve()  # the file the gate measures
        loaded_students = [load_model(resolve_checkpoint(Path(path))[0]) for path in students]
    except CheckpointError as error:
        raise ValueError(str(error)) from error
    chosen = []
    for path, loaded in zip(students, loaded_students, strict=True):
        distilled = loaded.config.distill
        if distilled is None:
            raise ValueError(f"{path} is not a distilled student")
        if Path(distilled.teacher).resolve() != teacher:
            raise ValueError(f"{path} was distilled from {distilled.teacher}, not from {teacher}")
        name = f"distill.{distilled.method}-S{distilled.steps}"
        if name in [prefix for prefix, *_ in chosen]:
            raise ValueError(f"two students are {name[len('distill.') :]}: give one of each method and step count")
        student = student_for_steps(loaded, distilled.steps)
        clip = student.config.sample.clip_x0
        chosen.append(
            (name, student, SamplerSpec(distilled.sampler, distilled.steps, 0.0, distilled.spacing, clip_x0=clip))
        )
    return chosen


def student_figures(run: Path, students: list[Path], judge) -> dict[str, float]:
    """Each student of ``run``'s teacher at its own step count, sampled as `ddim sample` samples it:
    500 seeds (0..499) as they come, 50 per class with `--class k`, 500 with the null label."""
    import numpy as np
    from eval_digits import to_digit_scale
    from eval_distill import sample_rows

    figures: dict[str, float] = {}
    classes = [k for k in range(10) for _ in range(50)]
    for name, chosen, spec in students_of(run, students):
        for mode, keys in (
            ("default", ("confident", "pca_fd")),
            ("per-class", ("in_class",)),
            ("unconditional", ("confident", "balance_tv")),
        ):
            images, _ = sample_rows(
                chosen,
                spec,
                n=500,
                seed=0,
                classes=classes if mode == "per-class" else None,
                guidance=0.0,  # distilled in
                rescale=0.0,
                unconditional=mode == "unconditional",
            )
            asked = np.array(classes) if mode == "per-class" else None
            scores = judge.score(to_digit_scale(images), asked)
            figures |= {f"{name}.{mode}.{key}": scores[key] for key in keys}
    return figures


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9=.+-]+", "-", name.lower().replace("->", "to")).strip("-")


@dataclass(frozen=True)
class Verdict:
    name: str
    baseline: float | None
    measured: float | None
    allowed: float | None  # the worst value that still passes
    status: str  # ok, REGRESSED, missing (a baseline figure of a group that ran, not measured), new


def judge_figures(baseline: dict, measured: dict[str, float], groups: list[str]) -> list[Verdict]:
    """Each baseline figure of the groups that ran against its measurement, then any new figure."""
    verdicts = []
    for name, spec in baseline["figures"].items():
        if _group_of(name) not in groups:
            continue
        allowed = allowed_value(spec)
        value = measured.get(name)
        if value is None:
            verdicts.append(Verdict(name, spec["value"], None, allowed, "missing"))
            continue
        worse = value > allowed if spec["better"] == "lower" else value < allowed
        verdicts.append(
            Verdict(name, spec["value"], value, allowed, "REGRESSED" if worse or math.isnan(value) else "ok")
        )
    verdicts += [Verdict(n, None, v, None, "new") for n, v in measured.items() if n not in baseline["figures"]]
    return verdicts


def allowed_value(spec: dict) -> float:
    """The worst passing value: the baseline moved by its tolerance, and never past a hard ``limit``."""
    value, lower = spec["value"], spec["better"] == "lower"
    if "factor" in spec:
        allowed = value * spec["factor"] if lower else value / spec["factor"]
    else:
        allowed = value + spec["slack"] if lower else value - spec["slack"]
    if "limit" in spec:
        allowed = min(allowed, spec["limit"]) if lower else max(allowed, spec["limit"])
    return allowed


def baseline_from_runs(
    runs: list[dict[str, float]], about: str, limits: dict[str, float], earlier: dict[str, list[float]] | None = None
) -> dict:
    """The baseline from the figures of several trainings (see the module's docstring); ``limits``:
    the issues' hard limits, by figure; ``earlier``: values of earlier trainings to count too, by
    figure (those of a figure whose measurement has not changed since)."""
    if len(runs) < MIN_RUNS:
        raise ValueError(f"a baseline needs the figures of at least {MIN_RUNS} trainings, got {len(runs)}")
    names = sorted(set().union(*runs))
    if missing := [n for n in names if any(n not in run for run in runs)]:
        raise ValueError(f"{missing[0]} was not measured in every run; measure every group on each training")
    figures = {}
    for name in names:
        values = [float(v) for v in (earlier or {}).get(name, [])] + [float(run[name]) for run in runs]
        better, kind, floor = FLOORS[name.rsplit(".", 1)[1]]
        if kind == "factor":  # ratios: spread of the logarithms, geometric mean
            logs = [math.log(max(v, 1e-30)) for v in values]
            spec = {"value": math.exp(statistics.fmean(logs)), "better": better}
            spec["factor"] = max(floor, math.exp(SPREAD * statistics.stdev(logs)))
        else:
            spec = {"value": statistics.fmean(values), "better": better}
            spec["slack"] = max(floor, SPREAD * statistics.stdev(values))
        if name in limits:
            spec["limit"] = limits[name]
        figures[name] = {**spec, "runs": values}
    return {"about": about, "figures": figures}


def _about_by_group(baseline: dict, figures: dict) -> dict[str, str]:
    """What the baseline's runs were, for each group of ``figures`` (an old baseline: one story)."""
    about = baseline.get("about", "")
    groups = {_group_of(name) for name in figures}
    return {group: about if isinstance(about, str) else about.get(group, "") for group in groups}


def print_table(verdicts: list[Verdict]) -> None:
    print(f"{'figure':<64} {'baseline':>10} {'measured':>10} {'allowed':>10}  status")
    for v in verdicts:
        cells = [f"{x:>10.4g}" if x is not None else " " * 10 for x in (v.baseline, v.measured, v.allowed)]
        print(f"{v.name:<64} {' '.join(cells)}  {v.status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help="a trained quickstart run directory or checkpoint")
    parser.add_argument(
        "--groups",
        help=f"comma-separated subset of {','.join(GROUPS)} (default: all; distillation only with --students)",
    )
    parser.add_argument("--students", default="", help="comma-separated run directories of students distilled from RUN")
    parser.add_argument(
        "--jobs", type=int, default=2, help="processes that measure groups side by side (1: all in this one)"
    )
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="the baseline to compare with (or write)")
    parser.add_argument("--json", type=Path, help="also write the measured figures here")
    parser.add_argument(
        "--baseline-from", type=Path, nargs="+", metavar="JSON", help="write --baseline from these runs' --json files"
    )
    parser.add_argument("--about", default="", help="with --baseline-from: what the runs were")
    parser.add_argument(
        "--keep-runs-except",
        metavar="REGEX",
        help="with --baseline-from: count the current baseline's runs too, for each figure whose name does not "
        "match REGEX (the figures whose measurement changed; '$^' keeps them all)",
    )
    args = parser.parse_args(argv)
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else {"figures": {}}
    if args.baseline_from:
        limits = {n: spec["limit"] for n, spec in baseline["figures"].items() if "limit" in spec}
        runs = []
        for path in args.baseline_from:
            try:
                runs.append(json.loads(path.read_text()))
            except (OSError, ValueError) as error:
                parser.error(f"--baseline-from {path}: {error}")
        earlier = {}
        if args.keep_runs_except is not None:
            try:
                changed = re.compile(args.keep_runs_except)
            except re.error as error:
                parser.error(f"--keep-runs-except: not a regular expression ({error})")
            earlier = {n: spec["runs"] for n, spec in baseline["figures"].items() if not changed.search(n)}
        try:
            new = baseline_from_runs(runs, args.about, limits, earlier)
        except ValueError as error:
            parser.error(str(error))
        measured_groups = {_group_of(name) for name in new["figures"]}
        others = {n: spec for n, spec in baseline["figures"].items() if _group_of(n) not in measured_groups}
        if others:  # the runs measured some groups: the others keep their figures and their story
            about = {**_about_by_group(baseline, others), **{group: args.about for group in measured_groups}}
            new = {"about": about, "figures": {**others, **new["figures"]}}
        args.baseline.write_text(json.dumps(new, indent=1) + "\n")
        kept = f" and the earlier runs of {len(set(earlier) & set(new['figures']))} figures" if earlier else ""
        print(f"wrote {args.baseline}: {len(new['figures'])} figures from {len(runs)} runs{kept}")
        return 0
    if args.run is None:
        parser.error("give a trained run to measure (or --baseline-from)")
    students = [Path(s) for s in args.students.split(",") if s]
    groups = args.groups.split(",") if args.groups else [g for g in GROUPS if g != "distillation" or students]
    try:
        _check_groups(groups, students)
        if students and "distillation" not in groups:
            raise ValueError("--students are measured by the distillation group; add it to --groups")
        students_of(args.run, students)  # a wrong run (even with no students) or student refused now, not later
        start = time.perf_counter()
        if args.jobs < 2:
            measured = measure(args.run, groups, students=students)
        else:
            measured = measure_in_parallel(args.run, groups, args.jobs, students)
    except ValueError as error:
        parser.error(str(error))
    print(f"measured {len(measured)} figures in {time.perf_counter() - start:.0f} s ({args.jobs} process(es))")
    if args.json:
        args.json.write_text(json.dumps(measured, indent=1) + "\n")
    verdicts = judge_figures(baseline, measured, groups)
    print_table(verdicts)
    failed = [v for v in verdicts if v.status in ("REGRESSED", "missing")]
    print(f"quality gate: {len(verdicts) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
