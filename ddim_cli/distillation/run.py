"""What ``ddim distill`` does: a few-step student of a trained teacher, as a run directory like
``ddim train``'s (config.yaml with a ``distill:`` section, metrics.jsonl and metrics.png, train.log,
sample grids, durable checkpoints, the run lock, bit-exact ``--resume``, torchrun), run by the one
loop of :mod:`ddim_cli.run_loop` with the method's objective.

Randomness of step k on rank r comes from ``(train.seed, k, r)`` as in training, and a round's
teacher is a file in the run, so a resumed run is bit-identical on CPU to one that never stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ddim_cli import run_loop
from ddim_cli.checkpoint import load_checkpoint, remove_partial_writes
from ddim_cli.config import Config
from ddim_cli.data import DataError, build_dataset
from ddim_cli.distillation.dmd import DistributionMatching
from ddim_cli.distillation.methods import ConsistencyDistillation, ProgressiveDistillation
from ddim_cli.distillation.objective import Distillation
from ddim_cli.models import STUDENTS, kept_students
from ddim_cli.monitor import tensorboard_missing
from ddim_cli.run_loop import TrainingError, check_run_dir, setup_distributed
from ddim_cli.runlock import run_lock
from ddim_cli.stopping import StopFlag, deadline

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
    stop = StopFlag(deadline(config.train.time_limit, time.time()))
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if config.train.tensorboard and (missing := tensorboard_missing()):
        raise TrainingError(missing)
    shard, device_ = setup_distributed(device)
    if config.train.batch_size % shard.world:
        raise TrainingError(f"train.batch_size {config.train.batch_size} does not split evenly over {shard.world}")
    try:
        dataset = build_dataset(config.data)
    except DataError as error:
        raise TrainingError(str(error)) from None
    teacher = load_checkpoint(Path(config.distill.teacher))  # checked before anything is written
    # From here a stop signal (or the time limit) ends the run cleanly at the end of a step.
    with stop.installed(), run_lock(run_dir, enabled=shard.main) as note:
        if note:
            tqdm.write(f"note: {note}")
        if shard.main:
            for path in remove_partial_writes(run_dir / "checkpoints") + remove_partial_writes(run_dir / STUDENTS):
                tqdm.write(f"note: removed {path}, a checkpoint write that a killed process left unfinished")
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
