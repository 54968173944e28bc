"""How many CPU threads a job runs with: from its work and from the cores other processes leave free.

PyTorch's CPU kernels split each operation over OpenMP threads that meet at a barrier when it ends.
On a core another process keeps busy, a thread waits to be scheduled and every barrier waits for
it: with both cores of a 2-core machine busy, sampling one digit took 26.6 s with 2 threads and
0.36 s with 1 (issue 37). And a tiny operation gains nothing from a second thread: on a 2-core AMD
EPYC (AVX-512) the quickstart U-Net's calls of 0.13 GFLOP (2 images) ran at 0.75x the speed on two
threads, of 0.26 GFLOP as fast as on one, of 0.5 GFLOP or more 1.2-1.8x faster (BENCHMARKS.md, "CPU
threads"). So ``auto`` gives a job one thread per :data:`GFLOP_PER_THREAD` of work per call, at
most the cores that are free now. Training takes every core (per rank) whatever the load: its
arithmetic depends on the thread count, and a resumed run must equal an uninterrupted one. A user's
``--threads N`` (or ``OMP_NUM_THREADS``) is taken as it is.
"""

from __future__ import annotations

import os
import time

import torch

# Work per network call that repays one more thread (measured as above).
GFLOP_PER_THREAD = 0.25
# How long the cores' idle time is sampled for: long enough for the kernel's 100 Hz tick counts.
SAMPLE_SECONDS = 0.1


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as a scheduler's cgroup sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores kept busy by other processes, measured from ``/proc/stat`` over ``seconds`` while
    this one sleeps; 0 where there is no ``/proc/stat`` (then every core counts as free)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    before = _cpu_times(cpus)
    if not before:
        return 0.0
    time.sleep(seconds)
    after = _cpu_times(cpus)
    busy = 0.0
    for cpu, (total, idle) in after.items():
        total_0, idle_0 = before.get(cpu, (total, idle))
        if total > total_0:
            busy += 1.0 - (idle - idle_0) / (total - total_0)
    return busy


def _cpu_times(cpus: set[int] | None) -> dict[int, tuple[int, int]]:
    """``{cpu: (all ticks, idle ticks)}`` from ``/proc/stat`` (idle includes I/O wait)."""
    try:
        with open("/proc/stat") as stat:
            lines = stat.readlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        cpu = int(name[3:])
        if cpus is not None and cpu not in cpus:
            continue
        ticks = [int(field) for field in fields[:8]]  # user nice system idle iowait irq softirq steal
        times[cpu] = (sum(ticks), ticks[3] + ticks[4])
    return times


def choose_threads(
    requested: int | None,
    gflop_per_call: float | None = None,
    *,
    cores: int | None = None,
    busy: float | None = None,
    processes: int = 1,
) -> int:
    """Threads for a job: ``requested`` if given; else one per :data:`GFLOP_PER_THREAD` of
    ``gflop_per_call`` (None: a job big enough for every core, such as training), at most the
    cores not ``busy`` with other processes, shared among this machine's ``processes`` ranks."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return requested
    cores = usable_cores() if cores is None else cores
    per_process = max(1, cores // max(1, processes))
    useful = per_process if gflop_per_call is None else int(gflop_per_call / GFLOP_PER_THREAD)
    busy = busy_cores() if busy is None else busy
    free = cores - round(busy)
    return max(1, min(useful, free, per_process))


def local_processes() -> int:
    """This machine's ranks under torchrun (its ``LOCAL_WORLD_SIZE``), else 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def set_threads(requested: int | None, gflop_per_call: float | None = None, *, follow_load: bool = True) -> int:
    """Set PyTorch's CPU threads for this job (see :func:`choose_threads`; torchrun's ranks on one
    machine share its cores) and return the count. An ``OMP_NUM_THREADS`` in the environment is the
    user's choice: it stays. ``follow_load=False`` ignores other processes: a training run's
    gradient sums are split by thread, so its thread count must not follow the machine's load of
    the moment, or a resumed run would not match an uninterrupted one bit for bit."""
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    busy = None if follow_load else 0.0
    threads = choose_threads(requested, gflop_per_call, busy=busy, processes=local_processes())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
