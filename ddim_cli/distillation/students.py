"""A student's config: the teacher's network and data with a ``distill:`` section, and a ``sample:``
section that samples the student as it was trained; the rounds of a run and where each round's
student is kept."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from ddim_cli.config import Config, ConfigError, DistillConfig, apply_override, validate
from ddim_cli.distillation.consistency import consistency_times
from ddim_cli.distillation.progressive import distillation_grid, halving_rounds
from ddim_cli.models import STUDENTS
from ddim_cli.schedule import timesteps


def best_method(steps: int) -> str:
    """The method whose students measured best at ``steps`` steps on the digits (BENCHMARKS.md,
    "Distribution matching distillation, fifth round"): DMD for 1, 2 and 4 steps (so up to 4),
    consistency for more, where DMD was not measured."""
    return "dmd" if steps <= 4 else "consistency"


# What the command's own options decide, with the recipe that goes with them.
_SET_BY_OPTIONS = {
    "distill.method": "give --method instead (it also chooses that method's recipe)",
    "distill.steps": "give --steps instead (it also chooses the recipe for that step count)",
    "distill.teacher": "the teacher is SOURCE",
}


def student_config(
    teacher: Config, teacher_path: Path, *, method: str | None = None, steps: int = 4, overrides=()
) -> Config:
    """The run's config: the teacher's network and data, a ``distill:`` section, and a ``sample:``
    section that samples the student as it was trained (its steps, trailing spacing, no extra
    guidance). ``method`` None: :func:`best_method` for ``steps``. Raises ConfigError for what
    cannot be distilled, in one line."""
    method = method or best_method(steps)
    if teacher.distill is not None:
        raise ConfigError(
            f"{teacher_path} is already a distilled student; distil its teacher ({teacher.distill.teacher})"
        )
    if teacher.model.prediction == "eps":
        raise ConfigError(
            "distillation needs a v- or x0-prediction teacher; this one predicts eps, from which a student cannot "
            "recover x0 at t = T-1 where alpha is ~0 (Salimans & Ho 2022, Section 4): train the teacher with "
            "--set model.prediction=v"
        )
    config = copy.deepcopy(teacher)
    conditional = teacher.model.num_classes is not None
    config.distill = DistillConfig(
        method=method,
        teacher=str(Path(teacher_path).resolve()),
        steps=steps,
        # 16 DDIM steps (a short schedule: its largest power of two), at least one round above --steps;
        # fewer, longer rounds measured best on the digits (BENCHMARKS.md, "Distillation")
        teacher_steps=max(min(16, _power_of_two(teacher.diffusion.num_timesteps)), 2 * steps),
        guidance=teacher.sample.guidance if conditional else 0.0,
        guidance_rescale=teacher.sample.guidance_rescale if conditional else 0.0,
    )
    if method == "consistency":  # one round on a 32-point grid at a lower rate: 2x the quickstart's training time
        config.distill.round_steps, config.distill.lr = 1150, 2e-4
    config.distill.grid_points = min(32, _power_of_two(teacher.diffusion.num_timesteps))
    if method == "dmd":  # the best recipes measured (1.5-2.0x the teacher's training; BENCHMARKS.md)
        config.distill.round_steps, config.distill.lr, config.train.batch_size = 1000, 3e-4, 32
        config.distill.fake_batch = 16  # the fake score's updates on halves of one draw: as good, in 0.7x the time
        config.distill.lr_schedule = "cosine"  # a generator that settles: PCA-FD gap to the teacher 1.0 -> 0.2
        if steps > 1:  # every call regressed: 850 steps beat the teacher's 50 at 4 steps, in 1.64-1.95x its time
            config.distill.round_steps = 850
        else:  # the regression's weight fading to 0: 1500-sample PCA-FD 9.9 -> 9.3, means of three seeds
            config.distill.regression_schedule = "cosine"  # (at 2 or 4 steps it cost 2-6: later calls need it)
        if steps <= 2:  # a fake score that keeps up with the generator (the two time-scale rule by rate as
            # well as by count): 3 updates at 3x its rate, on ten sets of 500 at 1 step against 4 at 2x
            # PCA-FD -1.0, +0.1, -0.3 from three seeds, at 2 steps against 4 at 1x -0.4, -0.4 from two,
            # in 0.9x the time; at 4 steps +0.6, worse; 4 at 3x and 2 at 4x worse at 1 (BENCHMARKS.md)
            config.distill.fake_updates, config.distill.fake_lr = 3, 3 * config.distill.lr
        else:  # 4 steps: 4 updates at 2x its rate against 4 at 1x, PCA-FD -0.2, -0.1, -0.3 from three seeds
            config.distill.fake_lr = 2 * config.distill.lr  # in the same time (3 at 3x: +0.6); measured at 4 only
    config.name = f"{teacher.name}-{method}-S{steps}"
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in _SET_BY_OPTIONS:  # set afterwards, it would keep the other method's or step count's recipe
            raise ConfigError(f"--set {key}: {_SET_BY_OPTIONS[key]}")
        apply_override(config, override)
    validate(config)
    if config.distill.method == "progressive":
        T = config.diffusion.num_timesteps
        if config.distill.teacher_steps == config.distill.steps:
            raise ConfigError(
                f"distill.teacher_steps {config.distill.teacher_steps} equals --steps: nothing to distil; "
                "the teacher needs more steps than its student"
            )
        for count in halving_rounds(config.distill.teacher_steps, config.distill.steps):  # names the reachable
            # A student samples with `--skip trailing --steps N`: that must be the grid it learned.
            if not torch.equal(
                distillation_grid(T, config.distill.teacher_steps, count), timesteps(T, count, "trailing")
            ):
                raise ConfigError(
                    f"distill.teacher_steps {config.distill.teacher_steps} does not halve evenly to {count} steps "
                    f"on {T} timesteps; choose a teacher step count that divides {T} or is a power of two"
                )
    else:
        consistency_times(config.diffusion.num_timesteps, config.distill.grid_size, config.distill.steps)
    return with_student_steps(config, config.distill.steps)


def _power_of_two(count: int) -> int:
    """The largest power of two not above ``count``."""
    return 2 ** int(math.log2(count))


def with_student_steps(config: Config, steps: int) -> Config:
    """``config`` as the ``steps``-step student's: ``sample`` set to how it samples."""
    student = copy.deepcopy(config)
    student.distill.steps = steps
    student.sample.steps, student.sample.skip, student.sample.eta = steps, student.distill.spacing, 0.0
    student.sample.guidance = student.sample.guidance_rescale = 0.0  # guidance is distilled in
    student.train.steps = len(rounds(student)) * student.distill.round_steps
    validate(student)
    return student


def rounds(config: Config) -> list[int]:
    """The student step count of each round (consistency: one round)."""
    x = config.distill
    return halving_rounds(x.teacher_steps, x.steps) if x.method == "progressive" else [x.steps]


def student_path(run_dir: Path, steps: int) -> Path:
    return Path(run_dir) / STUDENTS / f"S{steps}.safetensors"  # what kept_students finds
