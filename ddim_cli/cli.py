"""The ``ddim`` app: the commands of :mod:`ddim_cli.commands` assembled into one Typer group, with
the tool's last line of defence against errors and closed pipes."""

from __future__ import annotations

import os
import signal
import warnings

import typer
from typer.core import TyperCommand, TyperGroup

from ddim_cli import __version__
from ddim_cli.commands import compare, convert, distill, edit, export, fid, invert, restore, sample, train


class _Group(TyperGroup):
    """The command group with the tool's last line of defence: an ``OSError`` that no command
    turned into a message (a full disk, a permission, a read-only file system) is one line and exit
    1; any other exception is a bug, reported in one line with how to see its traceback
    (``DDIM_DEBUG=1`` re-raises both)."""

    def get_params(self, ctx):
        return _without_flag_metavars(super().get_params(ctx))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as stop:
            signum = stop.signum if isinstance(stop, StopSignal) else signal.SIGINT
            by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
            typer.echo(f"interrupted{by}", err=True)
            raise typer.Exit(code=128 + signum) from None
        except Exception as error:
            # Usage errors, --help and exits belong to the command-line framework (typer vendors its click).
            if os.environ.get("DDIM_DEBUG") == "1" or type(error).__module__.split(".")[0] in ("click", "typer"):
                raise
            if isinstance(error, OSError):
                from ddim_cli.errors import describe_os_error

                typer.echo(f"error: {describe_os_error(error)}", err=True)
            else:
                first = (str(error).strip().splitlines() or [""])[0]
                typer.echo(
                    f"error: internal error ({type(error).__name__}: {first}); this is a bug: please report it "
                    "with the command you ran (DDIM_DEBUG=1 shows the traceback)",
                    err=True,
                )
            raise typer.Exit(code=1) from None


def _without_flag_metavars(params: list) -> list:
    """Flags take no value, so --help shows none for them (typer would show ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """Every command: its --help shows no value for flags."""

    def get_params(self, ctx):
        return _without_flag_metavars(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    name="ddim",
    help="Train denoising diffusion models and sample them with DDPM and DDIM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings' single line breaks rewrap; `code` shows as code
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


# In --help's order; each module owns one command.
for command in (train.train, distill.distill, sample.sample, invert.invert, edit.edit, restore.restore):
    app.command(cls=_Command)(command)
app.command(name="fid", cls=_Command)(fid.fid_command)
for command in (compare.compare, convert.convert, export.export):
    app.command(cls=_Command)(command)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


class StopSignal(KeyboardInterrupt):
    """SIGTERM, SIGHUP, SIGUSR1 or SIGUSR2 (a scheduler's stop) ends a command as Ctrl-C does, with
    its files whole and its journal kept; ``ddim train`` and ``distill`` handle them themselves
    while they run (they finish the step and write a checkpoint)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    raise StopSignal(signum)


def main() -> None:
    warnings.showwarning = _one_line_warning
    for name in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_stop)
    if hasattr(signal, "SIGPIPE"):
        # A reader that closed the pipe (`ddim sample --help | head`) ends the command quietly, as it
        # ends other Unix tools, instead of an "error: Broken pipe". That stop is no worse than kill -9,
        # which training and sampling runs are built to survive (their --resume).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    app()
