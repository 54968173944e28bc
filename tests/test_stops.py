"""Clean stops (issue 35): every stop signal, to the trainer or its whole process group with
DataLoader workers, at random moments; time limits; requeue; stops of torchrun's ranks."""

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train import set_rank_environment, tiny_config
from typer.testing import CliRunner

from ddim_cli.checkpoint import list_checkpoints, load_checkpoint
from ddim_cli.cli import app
from ddim_cli.stopping import TIME_LIMIT_STATUS, deadline, parse_duration
from ddim_cli.train import TrainingInterrupted, train

pytestmark = pytest.mark.faults

WITH_WORKERS = {"on_device": False, "num_workers": 2}  # the DataLoader path, whose workers see the signal too


def config_file(tmp_path, **train_values) -> Path:
    path = tmp_path / "tiny.yaml"
    values = {"steps": 100_000, "checkpoint_every": 100_000, "sample_every": 0, **train_values}
    path.write_text(tiny_config(train=values, data=WITH_WORKERS).to_yaml())
    return path


def start(command: list, env: dict | None = None) -> subprocess.Popen:
    """``python -m ddim_cli COMMAND`` as the leader of its own process group, as a batch job is."""
    return subprocess.Popen(
        [sys.executable, "-m", "ddim_cli", *map(str, command), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},  # the threads of the in-process reference: the same sums
        start_new_session=True,
    )


def in_process(command: list):
    """``ddim COMMAND`` in this process, as :func:`start` runs it (a resume needs no process of its
    own, and a start costs seconds of imports)."""
    return CliRunner().invoke(app, [*map(str, command), "--no-progress"])


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def stop_group(process: subprocess.Popen, run_dir: Path, sig: int, rng: random.Random) -> tuple[str, int]:
    """Signal the whole process group a random moment after a random number of steps; returns
    stderr and the step of the checkpoint the stop wrote."""
    wanted, deadline = rng.randint(1, 4), time.monotonic() + 120
    while logged_steps(run_dir) < wanted and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))
    os.killpg(process.pid, sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name} at step" in err and "Resume with:" in err, err
    assert "error:" not in err and "Traceback" not in err, err
    gone_by = time.monotonic() + 0.5  # the workers go with their parent: nothing is left behind
    while _group_alive(process.pid):
        assert time.monotonic() < gone_by, "the stopped job's DataLoader workers outlived it"
        time.sleep(0.01)
    stopped_at = int(err.split("at step ")[1].split(";")[0])
    assert load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1]).step == stopped_at
    return err, stopped_at


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    for x, y in ((a.model, b.model), (a.ema, b.ema)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def assert_matches_a_straight_run(run_dir: Path, tmp_path: Path, steps: int) -> None:
    """The stopped and resumed run's weights and EMA equal those of ``steps`` steps without a stop."""
    straight = tiny_config(train={"steps": steps, "checkpoint_every": 100_000, "sample_every": 0}, data=WITH_WORKERS)
    reference = train(straight, tmp_path / "reference", device="cpu", progress=False)
    assert_same_weights(list_checkpoints(run_dir / "checkpoints")[-1], reference.checkpoint)


@pytest.mark.parametrize(("sig", "seed"), [(signal.SIGTERM, 1), (signal.SIGUSR1, 3)])
def test_a_stop_signal_to_the_whole_group_with_workers_stops_cleanly_and_resumes_bit_identically(tmp_path, sig, seed):
    run_dir = tmp_path / "stopped"
    process = start(["train", config_file(tmp_path), "--run-dir", run_dir])
    _, step = stop_group(process, run_dir, sig, random.Random(seed))

    resumed = in_process(["train", "--resume", run_dir, "--set", f"train.steps={step + 2}"])
    assert resumed.exit_code == 0, resumed.output
    assert_matches_a_straight_run(run_dir, tmp_path, step + 2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGUSR2])
def test_every_stop_signal_finishes_the_step_and_checkpoints_it(tmp_path, monkeypatch, sig):
    from ddim_cli import run_loop

    real_ema, taken = run_loop.update_ema, []

    def ema_then_signal(*args):  # the signal lands in the middle of step 2
        real_ema(*args)
        taken.append(1)
        if len(taken) == 2:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(run_loop, "update_ema", ema_then_signal)
    config = tiny_config(train={"steps": 100, "checkpoint_every": 100, "sample_every": 0})
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, tmp_path / "run", device="cpu", progress=False)
    assert (stopped.value.step, stopped.value.status) == (2, 128 + sig)
    assert f"stopped by {signal.Signals(sig).name} at step 2; checkpoint written" in str(stopped.value)
    assert [load_checkpoint(p).step for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [2]


def test_sigusr1_under_slurm_checkpoints_then_requeues_the_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run_dir = tmp_path / "run"
    process = start(["train", config_file(tmp_path, requeue=True), "--run-dir", run_dir], env)
    err, _ = stop_group(process, run_dir, signal.SIGUSR1, random.Random(1))
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in err and "requeued SLURM job 4242" in (run_dir / "train.log").read_text()


def test_a_time_limit_checkpoints_before_the_wall_and_the_same_line_resumes(tmp_path):
    run_dir = tmp_path / "run"
    command = ["train", config_file(tmp_path), "--run-dir", run_dir, "--resume-if-exists"]
    began = time.monotonic()
    process = start([*command, "--time-limit", "3"])
    _, err = process.communicate(timeout=120)
    assert process.returncode == TIME_LIMIT_STATUS, err
    assert "stopped by the time limit at step" in err and "error:" not in err, err
    [checkpoint] = list_checkpoints(run_dir / "checkpoints")
    step = load_checkpoint(checkpoint).step
    assert step >= 1 and time.monotonic() - began < 60

    # A requeued job runs the same line (the run keeps its time limit: this one grants the next job more).
    again = in_process([*command, "--time-limit", "1h", "--set", f"train.steps={step + 2}"])
    assert again.exit_code == 0, again.output
    assert f"resuming at step {step}" in (run_dir / "train.log").read_text()
    assert_matches_a_straight_run(run_dir, tmp_path, step + 2)


def test_resume_if_exists_starts_a_missing_run_and_refuses_a_bad_time_limit(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_config(train={"steps": 2, "sample_every": 0}).to_yaml())
    result = CliRunner().invoke(app, ["train", str(path), "--run-dir", str(tmp_path / "new"), "--resume-if-exists"])
    assert result.exit_code == 0, result.output
    assert "starting step 0" in (tmp_path / "new" / "train.log").read_text()
    bad = CliRunner().invoke(app, ["train", str(path), "--run-dir", str(tmp_path / "x"), "--time-limit", "soon"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == [
        "error: train.time_limit: expected a duration such as 3600, 90m, 4h, 1h30m or 04:00:00, got 'soon'"
    ]
    assert not (tmp_path / "x").exists()
    zero = CliRunner().invoke(app, ["train", str(path), "--run-dir", str(tmp_path / "x"), "--time-limit", "0"])
    assert zero.exit_code == 2 and zero.output.strip() == "error: train.time_limit: must be more than 0, got '0'"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90m", 5400), ("4h", 14400), ("1h30m", 5400), ("2d", 172800), ("0.5h", 1800)]
    + [("04:00:00", 14400), ("1-02:00:00", 93600), ("10:30", 37800)],
)
def test_durations_read_as_slurm_and_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1h30", "h", "-5", "4 h"])
def test_a_duration_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_the_deadline_is_the_earlier_of_the_time_limit_and_slurms_end(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    assert deadline("", 1000.0) is None and deadline("1h", 1000.0) == 4600.0
    monkeypatch.setenv("SLURM_JOB_END_TIME", "2000")
    assert deadline("1h", 1000.0) == 2000 - 30  # SLURM kills 30 s (KillWait) after its SIGTERM
    assert deadline("5m", 1000.0) == 1300.0


# --- torchrun's ranks ---------------------------------------------------------------------------------
def _stopped_rank(rank, world, port, runs, stop_after):
    """Train each ``(run_dir, steps)`` of ``runs`` in turn on this rank (resuming where a run has
    checkpoints); with ``stop_after``, rank 1 signals itself after that many steps of the first."""
    set_rank_environment(rank, world, port)
    import torch.distributed as dist

    from ddim_cli import run_loop

    dist.init_process_group("gloo")
    if rank == 1 and stop_after is not None:  # a signal to one rank only, in the middle of a step
        real_ema = run_loop.update_ema
        taken = []

        def ema_then_signal(*args):
            real_ema(*args)
            taken.append(1)
            if len(taken) == stop_after:
                os.kill(os.getpid(), signal.SIGTERM)

        run_loop.update_ema = ema_then_signal
    for run_dir, steps in runs:
        config = tiny_config(train={"steps": steps, "checkpoint_every": 100_000, "sample_every": 0, "log_every": 2})
        resume = (Path(run_dir) / "checkpoints").exists()
        try:
            train(config, Path(run_dir), resume=resume, device="cpu", progress=False)
        except TrainingInterrupted as stop:
            Path(run_dir, f"rank{rank}.stopped").write_text(f"{stop.step} {stop.status}")
    dist.destroy_process_group()


def _spawn(runs, stop_after=None):
    """Two ranks (one spawn: each pays torch's import once) training ``runs`` in turn."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = [(str(run_dir), steps) for run_dir, steps in runs]
    mp.spawn(_stopped_rank, args=(2, port, runs, stop_after), nprocs=2, join=True)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_resume_matches(tmp_path):
    # In one spawn (each pays torch's import once): the stopped run, its resume, a run never stopped.
    _spawn([(tmp_path / "run", 100), (tmp_path / "run", 6), (tmp_path / "reference", 6)], stop_after=3)
    # The ranks agree at the next logging step (every 2 here): both stop after step 4, rank 0 writes.
    assert [(tmp_path / "run" / f"rank{r}.stopped").read_text() for r in (0, 1)] == ["4 143", "4 143"]
    assert [load_checkpoint(p).step for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [4, 6]
    assert_same_weights(
        list_checkpoints(tmp_path / "run" / "checkpoints")[-1],
        list_checkpoints(tmp_path / "reference" / "checkpoints")[-1],
    )
