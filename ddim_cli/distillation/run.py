"""What ``ddim distill`` does: a few-step student of a trained teacher, as a run directory like
``ddim train``'s (config.yaml with a ``distill:`` section, metrics.jsonl and metrics.png, train.log,
sample grids, durable checkpoints, the run lock, bit-exact ``--resume``, torchrun), run by the one
loop of :mod:`ddim_cli.run_loop` with the method's objective.

Randomness of step k on rank r comes from ``(train.seed, k, r)`` as in training, and a round's
teacher is a file in the run, so a resumed run is bit-identical on CPU to one that never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddim_cli import run_loop
from ddim_cli.checkpoint import load_checkpoint
from ddim_cli.config import Config
from ddim_cli.distillation.dmd import DistributionMatching
from ddim_cli.distillation.methods import ConsistencyDistillation, ProgressiveDistillation
from ddim_cli.distillation.objective import Distillation
from ddim_cli.errors import TrainingError
from ddim_cli.models import STUDENTS, kept_students

OBJECTIVES: dict[str, type[Distillation]] = {
    "progressive": ProgressiveDistillation,
    "consistency": ConsistencyDistillation,
    "dmd": DistributionMatching,
}


@dataclass
class DistillResult:
    run_dir: Path
    step: int
    students: dict[int, Path]  # step count -> the student's checkpoint
    rank: int = 0  # under torchrun, this process's rank (only rank 0 writes)


def distill(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> DistillResult:
    """Distil ``config.distill.teacher`` into ``run_dir`` with ``config.distill.method``; ``config``
    comes from :func:`~ddim_cli.distillation.students.student_config` (or the run's config.yaml on
    resume)."""
    if config.distill is None:
        raise TrainingError(
            "the config has no distill: section (a training run's): continue a training run with "
            "ddim train --resume RUN_DIR, or distil its model with ddim distill RUN_DIR"
        )
    stop, shard, device_, dataset = run_loop.open_run(
        config, run_dir, resume=resume, overwrite=overwrite, device=device
    )
    teacher = load_checkpoint(Path(config.distill.teacher))  # checked before anything is written
    with run_loop.locked(run_dir, shard, stop, STUDENTS):
        objective = OBJECTIVES[config.distill.method](config, run_dir, teacher.ema, shard, device_)
        step, _ = run_loop.run(
            objective,
            config,
            run_dir,
            dataset,
            shard,
            device_,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            stop=stop,
        )
        return DistillResult(run_dir, step, kept_students(run_dir), shard.rank)
