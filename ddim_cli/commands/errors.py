"""One-line errors: what every command prints instead of a traceback, and the exit status."""

from __future__ import annotations

from contextlib import contextmanager
from typing import NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


@contextmanager
def user_errors():
    """Our one-line errors become ``error: ...`` and exit 1; bad option values exit 2."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.export import ExportError
    from ddim_cli.fid import FIDError
    from ddim_cli.images import ImageFileError
    from ddim_cli.outputs import OutputError

    try:
        yield
    except (CheckpointError, ImageFileError, FIDError, OutputError, ExportError) as error:
        fail(str(error))
    except ValueError as error:  # the library's checks of steps, eta, spacing, ...
        fail(str(error), code=2)
    except Exception as error:
        fail_if_compile_error(error, "run again with --no-compile")
        raise


@contextmanager
def run_errors(compile_remedy: str):
    """A training or distillation run's end: a stop prints its message and exits with its status
    (128 + the signal, or the time limit's); the run's one-line errors exit 1."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.run_loop import TrainingError, TrainingInterrupted
    from ddim_cli.runlock import RunBusyError

    try:
        yield
    except TrainingInterrupted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(code=stop.status) from None
    except (TrainingError, CheckpointError, RunBusyError) as error:
        fail(str(error))
    except Exception as error:
        fail_if_compile_error(error, compile_remedy)
        raise


def fail_if_compile_error(error: Exception, remedy: str) -> None:
    """torch.compile is on by default on CUDA; a machine without its toolchain (Triton, a C
    compiler) fails inside it. Say so in one line instead of dynamo's long traceback."""
    module = type(error).__module__
    if module.startswith(("torch._dynamo", "torch._inductor")):
        cause = error.__cause__ or getattr(error, "inner_exception", None) or error
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        fail(f"torch.compile failed ({type(cause).__name__}: {first_line}); {remedy}")
