"""Output paths checked before any work, so that a long job never ends in an unwritable path, and
written whole or not at all, so that a stopped job never leaves a truncated file another tool reads."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ddim_cli.errors import os_error_reason


class OutputError(RuntimeError):
    """An output path that cannot be written, described in one line."""


def check_output(
    path: Path, *, directory: bool = False, inputs: Iterable[Path] = (), option: str = "", suffix: str | None = None
) -> None:
    """Raise :class:`OutputError` unless ``path`` (a file, or with ``directory`` a folder) can be
    written: it ends in ``suffix`` if one is given (what reads it back goes by the name: ``ddim fid``
    takes only an .npz for one, a viewer a .png), it is not one of ``inputs``, it is not a directory
    where a file is wanted (or the reverse), and a file can be created in its nearest existing folder
    (tried, then removed: this also catches read-only file systems, whoever runs the tool).
    ``option`` names it in the message."""
    path = Path(path)
    name = f"{option} {path}" if option else str(path)
    for source in inputs:
        if Path(source).exists() and path.exists() and os.path.samefile(source, path):
            raise OutputError(f"{name} is also an input; writing it would destroy the input")
    if suffix is not None and path.suffix != suffix:
        raise OutputError(f"{name} must end in {suffix}, the format it is written in")
    if directory and path.exists() and not path.is_dir():
        raise OutputError(f"{name} exists and is not a directory")
    if not directory and path.is_dir():
        raise OutputError(f"{name} is a directory; give a file name")
    folder = path if directory else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot create {name}: {folder} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(f"cannot write {name}: {folder} is not writable ({os_error_reason(error)})") from None
    if not directory and path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {name}: permission denied")


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write; once the writing succeeds it is renamed to
    ``path`` in one step, so a reader (a later FID, a resumed job) sees the old file, the new one
    or none, never a part. The temporary name is hidden and ends in ``.partial``, so no image or
    array loader takes it for an output; writers give their format explicitly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_whole(path: Path, text: str) -> None:
    with written_whole(path) as partial:
        partial.write_text(text)


def remove_partials(directory: Path, name: str = "*") -> None:
    """Remove what :func:`written_whole` left for files ``name`` in ``directory`` when its process
    was killed mid-write (a resumed job writes those files again)."""
    for partial in Path(directory).glob(f".{name}.*.partial"):
        partial.unlink(missing_ok=True)
