"""How a training or distillation run stops before its end without losing anything.

A cluster stops a job by signalling every process of it: SLURM sends SIGTERM at the time limit,
on preemption and on ``scancel`` (SIGUSR1 ahead of the limit with ``--signal=B:USR1@90``),
``timeout`` and systemd SIGTERM, a terminal SIGINT or SIGHUP. Each of :data:`STOP_SIGNALS` asks
the loop to finish its step, write a checkpoint of it and exit with ``128 + the signal's number``
(what a shell reports for a process that signal killed). A time limit (``train.time_limit``,
and SLURM's job end time when the job has one) stops the same way, early enough to write the
checkpoint, and exits with 124 (as ``timeout`` does). DataLoader workers ignore these signals:
their parent decides when to stop and takes them down.

Under torchrun the ranks agree on a stop at logging steps (one all-reduce), so every rank stops
after the same step and none waits in a collective that another has left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time

import torch
import torch.distributed as dist

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)
TIME_LIMIT_STATUS = 124  # the exit status of a run stopped by its time limit
TIME_LIMIT = -1  # StopFlag.reason of a time-limit stop; a signal's stop is its number
SLURM_END_SAFETY_S = 30.0  # SLURM kills this long (its KillWait) after the SIGTERM at the end


def exit_status(reason: int) -> int:
    return TIME_LIMIT_STATUS if reason == TIME_LIMIT else 128 + reason


def describe(reason: int) -> str:
    return "the time limit" if reason == TIME_LIMIT else signal.Signals(reason).name


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``3600``, ``90m``, ``4h``, ``1h30m``, ``2d``, or ``[D-]HH:MM[:SS]``
    (SLURM's ``--time``); a ValueError names what it expected."""
    text = text.strip()
    clock = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?", text)
    if clock:
        days, hours, minutes, seconds = (int(part or 0) for part in clock.groups())
        return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms]?)", text)
    spelled_out = "".join(number + unit for number, unit in parts) == text
    if text and spelled_out and (len(parts) == 1 or all(unit for _, unit in parts)):  # "1h30" is ambiguous
        return float(sum(float(number) * units[unit or "s"] for number, unit in parts))
    raise ValueError(f"expected a duration such as 3600, 90m, 4h, 1h30m or 04:00:00, got {text!r}")


def deadline(time_limit: str, started: float) -> float | None:
    """The wall-clock time (``time.time()``) by which the run must have stopped: ``time_limit``
    after ``started``, or SLURM's job end time (``SLURM_JOB_END_TIME``) less its kill delay,
    whichever comes first; None without either."""
    ends = []
    if time_limit:
        ends.append(started + parse_duration(time_limit))
    slurm_end = os.environ.get("SLURM_JOB_END_TIME", "")
    if slurm_end.isdigit() and int(slurm_end) > 0:
        ends.append(int(slurm_end) - SLURM_END_SAFETY_S)
    return min(ends) if ends else None


class StopFlag:
    """A stop asked for by a signal (``reason``: its number) or by the deadline (:data:`TIME_LIMIT`)."""

    def __init__(self, end: float | None = None):
        self.reason: int | None = None
        self.end = end
        self.last_check = time.time()
        self.check_interval = 0.0  # seconds between the last two checks
        self.checkpoint_seconds = 0.0  # the longest checkpoint write so far

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.reason is None:
                self.reason = signum

        previous = {}
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                previous[sig] = signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def time_is_up(self) -> bool:
        """Whether the next check would come too late to write a checkpoint before the deadline."""
        now = time.time()
        self.check_interval, self.last_check = now - self.last_check, now
        return self.end is not None and now + 1.5 * (self.check_interval + self.checkpoint_seconds) >= self.end

    def requested(self, world: int, check: bool) -> int | None:
        """The reason to stop after this step, the same on every rank, or None. With several
        ranks they agree only at ``check`` steps (the logging steps), to avoid a sync per step."""
        if world == 1:
            if self.reason is None and check and self.time_is_up():
                self.reason = TIME_LIMIT
            return self.reason
        if not check:
            return None
        mine = self.reason if self.reason is not None else (TIME_LIMIT if self.time_is_up() else 0)
        reason = torch.tensor([mine], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(reason, op=dist.ReduceOp.MAX)  # a signal's number outranks the time limit's -1
        agreed = int(reason.item())
        return None if agreed == 0 else agreed

    @contextlib.contextmanager
    def timing_checkpoint(self):
        start = time.perf_counter()
        yield
        self.checkpoint_seconds = max(self.checkpoint_seconds, time.perf_counter() - start)


def requeue_under_slurm() -> str:
    """Ask SLURM to queue this job again (``scontrol requeue $SLURM_JOB_ID``); what happened, in words."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not requeued: SLURM_JOB_ID is not set"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not requeue job {job}: {error}"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return f"could not requeue job {job}: scontrol exited {done.returncode}" + (f" ({said[0]})" if said else "")
    return f"requeued SLURM job {job}"


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's start: the signals that stop a run reach the whole process group,
    and the workers must outlive them while the main process finishes its step and writes a
    checkpoint (it ends them when it exits)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
