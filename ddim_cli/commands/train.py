"""ddim train: train a model from a YAML config, or resume a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.errors import fail, run_errors, user_errors
from ddim_cli.commands.options import (
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


def train(
    config_path: Annotated[
        Path | None, typer.Argument(metavar="CONFIG", help="YAML config (see configs/). Not needed with --resume.")
    ] = None,
    overrides: overrides_option("--set train.batch_size=64") = [],  # noqa: B006 (Typer reads, never mutates it)
    run_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where checkpoints, samples and logs go (default: runs/NAME, the config's name or file stem)."
        ),
    ] = None,
    resume: ResumeOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh in an existing run directory, replacing its run.")
    ] = False,
    resume_if_exists: ResumeIfExistsOpt = False,
    time_limit: TimeLimitOpt = None,
    threads: RunThreadsOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    device: DeviceOpt = Device.auto,
    progress: ProgressOpt = True,
) -> None:
    """Train a diffusion model from a YAML config (multi-GPU: launch with torchrun)."""
    from ddim_cli.config import ConfigError, load_config, resume_config
    from ddim_cli.run_loop import holds_run
    from ddim_cli.train import train as run_training

    if (config_path is None) == (resume is None):
        fail("give a CONFIG to start a run, or --resume RUN_DIR to continue one (not both)", code=2)
    if resume_if_exists and resume is not None:
        fail("--resume-if-exists goes with CONFIG (and --run-dir), not with --resume", code=2)
    if overwrite and resume is not None:
        fail("--overwrite starts a run afresh and --resume continues one: give one of them", code=2)
    overrides = with_run_options(overrides, time_limit, threads)
    source = resume / "config.yaml" if resume is not None else config_path
    try:
        config = load_config(source, overrides) if resume is None else resume_config(source, overrides)
        if resume_if_exists:
            existing = run_dir or Path("runs") / config.name
            if holds_run(existing) and (existing / "config.yaml").is_file():
                resume = existing  # the run's own config, with this command's overrides
                config = resume_config(existing / "config.yaml", overrides)
    except ConfigError as error:
        fail(str(error), code=2)
    if dry_run:
        typer.echo(config.to_yaml(), nl=False)
        return
    directory = resume if resume is not None else (run_dir or Path("runs") / config.name)
    with user_errors():
        check_outputs(directories=[("the run directory", directory)])
    again = "" if resume is not None else " --overwrite"  # a failed start left its log there
    with run_errors(f"run again with --set train.compile=false{again}"):
        result = run_training(
            config, directory, resume=resume is not None, overwrite=overwrite, device=device.value, progress=progress
        )
    if result.rank == 0:  # under torchrun, rank 0 reports
        typer.echo(f"trained to step {result.step}; latest checkpoint: {result.checkpoint}")
