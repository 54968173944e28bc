"""ddim train: train a model from a YAML config, or resume a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.common import check_outputs, fail, fail_if_compile_error, user_errors
from ddim_cli.commands.options import (
    HARDWARE_PANEL,
    OUTPUT_PANEL,
    Device,
    ResumeIfExistsOpt,
    ThreadsOpt,
    TimeLimitOpt,
    overrides_option,
    with_run_options,
)


def train(
    config_path: Annotated[
        Path | None, typer.Argument(metavar="CONFIG", help="YAML config (see configs/). Not needed with --resume.")
    ] = None,
    overrides: overrides_option("--set train.batch_size=64") = [],  # noqa: B006 (Typer reads, never mutates it)
    run_dir: Annotated[
        Path | None, typer.Option(help="Where checkpoints, samples and logs go (default: runs/<config name>).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(metavar="RUN_DIR", help="Continue the run in RUN_DIR from its latest checkpoint.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh in an existing run directory, replacing its run.")
    ] = False,
    resume_if_exists: ResumeIfExistsOpt = False,
    time_limit: TimeLimitOpt = None,
    threads: ThreadsOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    device: Annotated[
        Device, typer.Option(help="Where to train; auto picks CUDA when available.", rich_help_panel=HARDWARE_PANEL)
    ] = Device.auto,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.", rich_help_panel=OUTPUT_PANEL)] = True,
) -> None:
    """Train a diffusion model from a YAML config (multi-GPU: launch with torchrun)."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.config import ConfigError, load_config
    from ddim_cli.run_loop import holds_run
    from ddim_cli.runlock import RunBusyError
    from ddim_cli.train import TrainingError, TrainingInterrupted
    from ddim_cli.train import train as run_training

    if (config_path is None) == (resume is None):
        fail("give a CONFIG to start a run, or --resume RUN_DIR to continue one (not both)", code=2)
    if resume_if_exists and resume is not None:
        fail("--resume-if-exists goes with CONFIG (and --run-dir), not with --resume", code=2)
    overrides = with_run_options(overrides, time_limit, threads)
    source = resume / "config.yaml" if resume is not None else config_path
    try:
        config = load_config(source, overrides)
        if resume_if_exists:
            existing = run_dir or Path("runs") / config.name
            if holds_run(existing) and (existing / "config.yaml").is_file():
                resume = existing  # the run's own config, with this command's overrides
                config = load_config(existing / "config.yaml", overrides)
    except ConfigError as error:
        fail(str(error), code=2)
    if dry_run:
        typer.echo(config.to_yaml(), nl=False)
        return
    directory = resume if resume is not None else (run_dir or Path("runs") / config.name)
    with user_errors():
        check_outputs(directories=[("the run directory", directory)])
    try:
        result = run_training(
            config, directory, resume=resume is not None, overwrite=overwrite, device=device.value, progress=progress
        )
    except TrainingInterrupted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(code=stop.status) from None
    except (TrainingError, CheckpointError, RunBusyError) as error:
        fail(str(error))
    except Exception as error:
        again = "" if resume is not None else " --overwrite"  # the failed start left its log there
        fail_if_compile_error(error, f"run again with --set train.compile=false{again}")
        raise
    typer.echo(f"trained to step {result.step}; latest checkpoint: {result.checkpoint}")
