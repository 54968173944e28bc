"""Small jobs on an idle machine and beside a busy one: the CPU thread choice of issue 37.

    python scripts/bench_threads.py runs/digits [--repeats 2]

Times whole `ddim` commands (start-up included, as a user waits for them) with the automatic
thread choice, with every core (--threads N: what every job did before the choice existed) and with
one thread; first on an idle machine, then beside another `ddim train` that started on the idle
machine and so holds every core. Prints a Markdown table for BENCHMARKS.md with the device. Run it
on a quiet machine: anything else running is counted as load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ddim(*args: str) -> list[str]:
    return [sys.executable, "-m", "ddim_cli", *args]


def timed(command: list[str], repeats: int) -> float:
    """The median wall time of ``command`` over ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        subprocess.run(command, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jobs(run: str, work: Path) -> dict[str, list[str]]:
    common = ["--no-progress"]
    digits = sorted((work / "digits").glob("*.png"))[:4]
    return {
        "sample --class 3 --n 1 --steps 20": ddim(
            "sample", run, "--class", "3", "--n", "1", "--steps", "20", "--out", str(work / "a.png"), *common
        ),
        "sample --n 8 --steps 20": ddim(
            "sample", run, "--n", "8", "--steps", "20", "--out", str(work / "b.png"), *common
        ),
        "invert (4 digits) --steps 20": ddim(
            "invert", run, *map(str, digits), "--steps", "20", "--out", str(work / "inv"), *common
        ),
        "sample --n 256 --steps 50": ddim(
            "sample", run, "--n", "256", "--steps", "50", "--batch-size", "128", "--out", str(work / "c.png"), *common
        ),
    }


def device() -> str:
    import torch

    from ddim_cli.acceleration import _cpu_model

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{_cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {cores} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained run, e.g. runs/digits (the quickstart)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-all-cores-busy", action="store_true", help="skip the slow before-the-fix rows")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(
            ddim("sample", args.run, "--n", "4", "--steps", "10", "--out-dir", str(work / "digits"), "--no-progress"),
            check=True,
            capture_output=True,
        )
        table = {}
        for load in ("idle", "busy"):
            busy = None
            if load == "busy":  # another ddim job that started on the idle machine: it takes every core
                busy = subprocess.Popen(
                    ddim(
                        "train", "configs/digits.yaml", "--run-dir", str(work / "busy"), "--set", "train.steps=1000000"
                    )
                    + ["--no-progress"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(15)  # past its start-up, into its steps
            try:
                for name, command in jobs(args.run, work).items():
                    row = table.setdefault(name, {})
                    row[f"{load}, auto"] = timed(command, args.repeats)
                    row[f"{load}, 1 thread"] = timed([*command, "--threads", "1"], args.repeats)
                    slow = load == "busy" and (args.skip_all_cores_busy or "256" in name)
                    if not slow:
                        row[f"{load}, {cores} threads"] = timed([*command, "--threads", str(cores)], args.repeats)
                    print(name, {k: round(v, 2) for k, v in row.items()}, flush=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    columns = [f"{load}, {how}" for load in ("idle", "busy") for how in ("auto", "1 thread", f"{cores} threads")]
    print(f"\nWhole-command wall time in seconds (median of {args.repeats}), {device()}:\n")
    print("| job | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, row in table.items():
        cells = [f"{row[c]:.2f}" if c in row else "-" for c in columns]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
