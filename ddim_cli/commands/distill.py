"""ddim distill: a few-step student of a trained model (consistency, DMD or progressive distillation)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.errors import fail, run_errors, user_errors
from ddim_cli.commands.options import (
    OUTPUT_PANEL,
    Device,
    DeviceOpt,
    ProgressOpt,
    ResumeIfExistsOpt,
    ResumeOpt,
    RunThreadsOpt,
    TimeLimitOpt,
    overrides_option,
    with_run_options,
)
from ddim_cli.commands.running import check_outputs


class DistillMethod(str, Enum):
    progressive = "progressive"
    consistency = "consistency"
    dmd = "dmd"


def distill(
    source: Annotated[
        Path | None,
        typer.Argument(
            metavar="SOURCE",
            help="The teacher: a run directory or a checkpoint (v or x0 prediction). Not needed with --resume.",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        DistillMethod | None,
        typer.Option(
            "--method",
            help="Default: the best student measured for --steps, dmd for 1 to 4 steps and consistency for more. "
            "dmd: a generator whose samples match the teacher's distribution (Yin et al. 2023/2024); "
            "consistency: one student that samples in 1 step or a few (Song et al. 2023); progressive: "
            "rounds that halve the step count (Salimans & Ho 2022), every round's student kept.",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="The student's sampling steps (progressive: the last round's).")
    ] = 4,
    overrides: overrides_option("--set distill.round_steps=200 or --set train.batch_size=64") = [],  # noqa: B006
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir",
            help="Where the student run goes (default: runs/TEACHER-METHOD-SSTEPS, e.g. runs/digits-dmd-S1).",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    resume: ResumeOpt = None,
    resume_if_exists: ResumeIfExistsOpt = False,
    time_limit: TimeLimitOpt = None,
    threads: RunThreadsOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh in an existing run directory, replacing its run.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    device: DeviceOpt = Device.auto,
    progress: ProgressOpt = True,
) -> None:
    """Distil a trained model into a few-step student, as a run directory like `ddim train`'s.

    Without --method, the student that measured best for --steps: distribution matching (dmd) for
    1 to 4 steps, a generator whose samples match the teacher's distribution (trained at each of
    its --steps times by backward simulation); consistency distillation for more. Either samples
    in --steps network calls or in fewer whose times lie on its grid (`ddim sample RUN_DIR --steps
    1`).
    Progressive distillation (--method progressive) halves the teacher's 16 DDIM steps round by
    round down to --steps, keeping every round's student in RUN_DIR/students/ (S8, S4, ...);
    `ddim sample RUN_DIR` then samples with --steps and `--steps 8` with the 8-step student. A
    class-conditional student learns the teacher guided at its sample.guidance: one call per step
    gives the guided image. Multi-GPU: `torchrun --nproc_per_node N -m ddim_cli -- distill ...`.
    """
    from ddim_cli.config import resume_config
    from ddim_cli.distillation import distill as run_distillation
    from ddim_cli.distillation import student_config
    from ddim_cli.models import load_model, resolve_checkpoint

    if (source is None) == (resume is None):
        fail("give the teacher SOURCE to start a distillation, or --resume RUN_DIR to continue one (not both)", code=2)
    if resume_if_exists and resume is not None:
        fail("--resume-if-exists goes with SOURCE (and --run-dir), not with --resume", code=2)
    if overwrite and resume is not None:
        fail("--overwrite starts a run afresh and --resume continues one: give one of them", code=2)
    overrides = with_run_options(overrides, time_limit, threads)
    with user_errors():  # bad input (config keys, step counts, an eps teacher) is one line, nothing written
        if resume is not None or (resume_if_exists and _is_distillation_run(source)):
            directory = resume if resume is not None else run_dir or source  # the distillation run itself
            config = resume_config(directory / "config.yaml", overrides)
            resume = directory
        else:
            teacher = load_model(resolve_checkpoint(source)[0])
            config = student_config(
                teacher.config, teacher.checkpoint, method=method and method.value, steps=steps, overrides=overrides
            )
            directory = run_dir or Path("runs") / config.name
            if resume_if_exists and (directory / "config.yaml").is_file():
                config, resume = resume_config(directory / "config.yaml", overrides), directory
        if dry_run:
            typer.echo(config.to_yaml(), nl=False)
            return
        check_outputs(directories=[("the run directory", directory)])
    with run_errors("run again with --set train.compile=false"):
        result = run_distillation(
            config, directory, resume=resume is not None, overwrite=overwrite, device=device.value, progress=progress
        )
    if result.rank != 0:  # rank 0 reports
        return
    kept = ", ".join(f"{count} step{'s' if count > 1 else ''}: {path}" for count, path in result.students.items())
    typer.echo(f"distilled to step {result.step}; students ({kept})")
    typer.echo(f"sample with: ddim sample {directory}")


def _is_distillation_run(path: Path) -> bool:
    config = path / "config.yaml"
    return config.is_file() and "distill:" in config.read_text()
