"""One trainer per run directory: an advisory lock that a crashed process cannot leave behind.

The lock is ``fcntl.flock`` on ``RUN_DIR/.lock``, which the kernel releases when its process
exits, however it exits (kill -9, power loss of a node using a local disk). The file says who
holds it (pid and host) and is emptied on a clean exit; finding it non-empty but unlocked means
its holder died, and the lock is taken over with a note. (On network file systems without flock
support the lock is as good as their flock emulation.)
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class RunBusyError(RuntimeError):
    """Another process holds the run directory, described in one line."""


@contextlib.contextmanager
def run_lock(run_dir: Path, *, enabled: bool = True) -> Iterator[str | None]:
    """Hold ``run_dir``'s lock for the ``with`` block (creating the directory); yields a note when
    a lock left by a dead process was taken over. Raises :class:`RunBusyError` at once if another
    process holds it. ``enabled=False`` (other ranks of a distributed run) does nothing."""
    if not enabled:
        yield None
        return
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            raise RunBusyError(
                f"{run_dir} is in use by {holder} (a ddim train of this run); wait for it to finish or stop it"
            ) from None
        previous = _holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield f"took over the lock of {path}, left by {previous}, which is no longer running" if previous else None
        finally:
            os.ftruncate(fd, 0)  # emptied, not removed: removing would race with a process opening it
    finally:
        os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
    return os.pread(fd, 256, 0).decode(errors="replace").strip()
