"""The ``ddim`` command: a thin Typer layer over the library (one function per command)."""

from __future__ import annotations

import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ddim_cli import __version__

app = typer.Typer(
    name="ddim",
    help="Train denoising diffusion models and sample them with DDPM and DDIM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ddim-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train denoising diffusion models and sample them with DDPM and DDIM."""


def _not_yet(command: str) -> None:
    typer.echo(f"error: 'ddim {command}' is not implemented in this version yet", err=True)
    raise typer.Exit(code=1)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


@app.command()
def train(
    config_path: Annotated[
        Path | None, typer.Argument(metavar="CONFIG", help="YAML config (see configs/). Not needed with --resume.")
    ] = None,
    overrides: Annotated[
        list[str],
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.batch_size=64. Repeatable."
        ),
    ] = [],  # noqa: B006 (Typer reads the default, never mutates it)
    run_dir: Annotated[
        Path | None, typer.Option(help="Where checkpoints, samples and logs go (default: runs/<config name>).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(metavar="RUN_DIR", help="Continue the run in RUN_DIR from its latest checkpoint.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh in an existing run directory, replacing its run.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    device: Annotated[Device, typer.Option(help="Where to train; auto picks CUDA when available.")] = Device.auto,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a diffusion model from a YAML config (multi-GPU: launch with torchrun)."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.config import ConfigError, load_config
    from ddim_cli.train import TrainingError, TrainingInterrupted
    from ddim_cli.train import train as run_training

    if (config_path is None) == (resume is None):
        _fail("give a CONFIG to start a run, or --resume RUN_DIR to continue one (not both)", code=2)
    source = resume / "config.yaml" if resume is not None else config_path
    try:
        config = load_config(source, overrides)
    except ConfigError as error:
        _fail(str(error), code=2)
    if dry_run:
        typer.echo(config.to_yaml(), nl=False)
        return
    directory = resume if resume is not None else (run_dir or Path("runs") / config.name)
    try:
        result = run_training(
            config, directory, resume=resume is not None, overwrite=overwrite, device=device.value, progress=progress
        )
    except TrainingInterrupted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(code=130) from None
    except (TrainingError, CheckpointError) as error:
        _fail(str(error))
    typer.echo(f"trained to step {result.step}; latest checkpoint: {result.checkpoint}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sample() -> None:
    """Sample images from a checkpoint with DDIM or DDPM (not implemented yet)."""
    _not_yet("sample")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def invert() -> None:
    """Invert real images to latents with deterministic DDIM (not implemented yet)."""
    _not_yet("invert")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def compare() -> None:
    """Compare DDPM and DDIM samplers from the same noise (not implemented yet)."""
    _not_yet("compare")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


def main() -> None:
    warnings.showwarning = _one_line_warning
    app()
