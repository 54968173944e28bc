"""The ``ddim`` command: a thin Typer layer over the library (one function per command)."""

from __future__ import annotations

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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train() -> None:
    """Train a diffusion model from a YAML config (not implemented yet)."""
    _not_yet("train")


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


def main() -> None:
    app()
