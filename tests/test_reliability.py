"""Fault injection: crashes, damaged checkpoints, full disks, busy runs and unwritable outputs."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import tiny_config
from typer.testing import CliRunner

from ddim_cli import checkpoint as ckpt
from ddim_cli.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ddim_cli.cli import app
from ddim_cli.runlock import RunBusyError, run_lock
from ddim_cli.train import TrainingError, train

pytestmark = pytest.mark.faults  # pytest -m faults runs just these (about 2 minutes on 2 cores)


def tiny(**train_values):
    """test_train's tiny run, checkpointing every 2 steps and keeping them all."""
    return tiny_config(train={"checkpoint_every": 2, "sample_every": 0, "keep_checkpoints": 10, **train_values})


def run(config, run_dir, resume=False):
    return train(config, run_dir, resume=resume, device="cpu", progress=False)


def ddim(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, code=1):
    assert result.exit_code == code, result.output
    # Training logs its progress before a fault; the fault itself is one line.
    errors = [line for line in result.output.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def assert_same_weights(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    for x, y in ((a.model, b.model), (a.ema, b.ema)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6 (copy it before damaging it)."""
    directory = tmp_path_factory.mktemp("runs") / "run"
    run(tiny(), directory)
    return directory


@pytest.fixture
def fresh_copy(finished_run, tmp_path):
    import shutil

    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


# --- damaged checkpoints ------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_latest_checkpoint_falls_back_with_a_warning(fresh_copy, tmp_path, damage):
    latest = list_checkpoints(fresh_copy / "checkpoints")[-1]
    if damage == "truncate":
        truncate(latest)
    else:  # a flipped byte in the tensor data: only the checksum sees it
        data = bytearray(latest.read_bytes())
        data[len(data) // 3] ^= 0xFF  # inside the weights (the training state comes last)
        latest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(latest)
    with pytest.warns(UserWarning, match=f"{latest.name}.*using step-0000004.safetensors"):
        result = ddim("sample", fresh_copy, "--n", 2, "--out", tmp_path / "g.png", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "from " + str(fresh_copy / "checkpoints" / "step-0000004.safetensors") in result.output


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_matches_an_unbroken_run(finished_run, fresh_copy):
    truncate(list_checkpoints(fresh_copy / "checkpoints")[-1], keep=0.9)
    with pytest.warns(UserWarning, match="step-0000006.safetensors.*using step-0000004"):
        result = run(tiny(), fresh_copy, resume=True)
    assert result.step == 6
    assert_same_weights(result.checkpoint, list_checkpoints(finished_run / "checkpoints")[-1])


def test_a_damaged_training_state_is_one_line(fresh_copy):
    # Every checkpoint damaged: the newest's problem, in one line, through the CLI.
    for path in list_checkpoints(fresh_copy / "checkpoints"):
        truncate(path, keep=0.97)
    line = one_line_error(ddim("train", "--resume", fresh_copy, "--no-progress"))
    assert "step-0000006.safetensors" in line and "damaged" in line


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_resume(fresh_copy, finished_run):
    # A kill (or a full disk) in the middle of appending a line to metrics.jsonl, here the line of
    # step 7 of a run resumed from step 6: the resume drops the torn line and logs steps 7 and 8.
    with open(fresh_copy / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "loss": 0.1')
    result = run(tiny(steps=8), fresh_copy, resume=True)
    assert result.step == 8
    lines = (fresh_copy / "metrics.jsonl").read_text().splitlines()
    before = (finished_run / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(before)] == before and [json.loads(line)["step"] for line in lines[len(before) :]] == [7, 8]


def test_a_resume_that_would_change_the_model_or_also_overwrite_is_refused_and_writes_nothing(fresh_copy):
    before = {path: path.read_bytes() for path in sorted(fresh_copy.rglob("*")) if path.is_file()}
    line = one_line_error(ddim("train", "--resume", fresh_copy, "--set", "model.num_res_blocks=3"), 2)
    assert "model.num_res_blocks cannot change when a run is resumed (1 -> 3)" in line
    line = one_line_error(ddim("train", "--resume", fresh_copy, "--overwrite"), 2)
    assert "give one of them" in line  # --overwrite was once ignored beside --resume
    after = {path: path.read_bytes() for path in sorted(fresh_copy.rglob("*")) if path.is_file()}
    assert after == before


def test_legacy_checkpoints_still_resume_and_a_truncated_state_pt_falls_back(fresh_copy):
    # Rewrite the run in the format of ddim-cli-checkpoint-1: weights file + .state.pt beside it.
    for path in list_checkpoints(fresh_copy / "checkpoints"):
        full = load_checkpoint(path, training_state=True)
        torch.save(full.training_state, ckpt.state_path(path))
        tensors = {f"model.{k}": v for k, v in full.model.items()} | {f"ema.{k}": v for k, v in full.ema.items()}
        from safetensors.torch import save_file

        metadata = {"format": "ddim-cli-checkpoint-1", "step": str(full.step), "config": full.config.to_yaml()}
        save_file(tensors, str(path), metadata=metadata)
    truncate(ckpt.state_path(list_checkpoints(fresh_copy / "checkpoints")[-1]))
    with pytest.warns(UserWarning, match="state.pt is damaged.*using step-0000004"):
        result = run(tiny(steps=8), fresh_copy, resume=True)
    assert result.step == 8


# --- writing: durability, a full disk, permissions -------------------------------------------------
def test_a_full_disk_while_checkpointing_leaves_no_partial_files_and_names_the_last_checkpoint(tmp_path, monkeypatch):
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the second checkpoint's file cannot be flushed: the disk is full
        calls.append(fd)
        if len(calls) == 3:  # file, directory of the first checkpoint; then the second's file
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    with pytest.raises(TrainingError) as failure:
        run(tiny(), tmp_path / "run")
    message = str(failure.value)
    assert "could not write the checkpoint of step 4 (no space left on the device)" in message
    assert message.endswith(
        f"the last complete checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-0000002.safetensors'}"
    )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000002.safetensors"]
    load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000002.safetensors", training_state=True)


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(tiny().to_yaml())

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    line = one_line_error(ddim("train", tmp_path / "tiny.yaml", "--run-dir", tmp_path / "run", "--no-progress"))
    assert "no space left on the device" in line and "no checkpoint was written yet" in line
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def test_an_os_error_anywhere_is_one_line_and_a_bug_says_how_to_see_it(finished_run, tmp_path, monkeypatch):
    import ddim_cli.sample_files as sample_files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "g.png"))

    monkeypatch.setattr(sample_files, "save_grid", full)
    line = one_line_error(ddim("sample", finished_run, "--n", 1, "--out", tmp_path / "g.png", "--no-progress"))
    assert line == f"error: no space left on the device: {tmp_path / 'g.png'}"

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(sample_files, "save_grid", bug)
    line = one_line_error(ddim("sample", finished_run, "--n", 1, "--out", tmp_path / "g.png", "--no-progress"))
    assert "internal error (TypeError: unsupported operand)" in line and "DDIM_DEBUG=1" in line
    monkeypatch.setenv("DDIM_DEBUG", "1")
    result = ddim("sample", finished_run, "--n", 1, "--out", tmp_path / "g.png", "--no-progress")
    assert isinstance(result.exception, TypeError)  # the traceback, for a bug report


def test_checkpoints_honour_the_umask_and_leave_no_temporary_files(tmp_path):
    old = os.umask(0o027)
    try:
        run(tiny(steps=2), tmp_path / "run")
    finally:
        os.umask(old)
    files = list((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in files] == ["step-0000002.safetensors"]
    assert files[0].stat().st_mode & 0o777 == 0o640


# --- a busy run directory ---------------------------------------------------------------------------
def test_a_second_trainer_is_refused_at_once_naming_the_holder(finished_run, tmp_path):
    with run_lock(finished_run):
        start = time.monotonic()
        line = one_line_error(ddim("train", "--resume", finished_run, "--no-progress"))
        assert time.monotonic() - start < 30
    assert f"is in use by pid {os.getpid()} on " in line
    with pytest.raises(RunBusyError), run_lock(tmp_path), run_lock(tmp_path):
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(fresh_copy, capsys):
    (fresh_copy / ".lock").write_text("pid 999999 on elsewhere\n")  # written, never released by a crash
    run(tiny(steps=8), fresh_copy, resume=True)
    out = capsys.readouterr().out
    assert "note: took over the lock" in out and "left by pid 999999 on elsewhere" in out
    assert (fresh_copy / ".lock").read_text() == ""  # emptied on a clean exit


# --- outputs checked before the work ----------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--out", "file/grid.png", "is not a directory"),
        ("--npz", "dir.npz", "is a directory; give a file name"),
        ("--out-dir", "file", "exists and is not a directory"),
        ("--npz", "CHECKPOINT", "is also an input"),
        # fid reads an .npz only by its name, and a grid named .jpg held a PNG
        ("--npz", "samples", "--npz {} must end in .npz, the format it is written in"),
        ("--out", "grid.jpg", "must end in .png"),
        ("--save-latents", "z.npz", "must end in .npy"),
    ],
)
def test_unwritable_outputs_fail_before_any_sampling(finished_run, tmp_path, monkeypatch, option, value, message):
    import ddim_cli.jobs.sample as generate

    def never(*args, **kwargs):
        raise AssertionError("sampled before checking the outputs")

    monkeypatch.setattr(generate, "generate", never)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.npz").mkdir()
    checkpoint = list_checkpoints(finished_run / "checkpoints")[-1]
    target = checkpoint if value == "CHECKPOINT" else tmp_path / value
    line = one_line_error(ddim("sample", checkpoint, option, target, "--n", 50000, "--no-progress"))
    assert message.format(target) in line
    if "must end in" in message:
        assert not target.exists()


# --- kill -9 at random moments ----------------------------------------------------------------------
def test_kill_9_at_random_moments_then_resume_gives_bit_identical_weights(tmp_path):
    config = tiny(steps=8, checkpoint_every=1)
    reference = run(config, tmp_path / "reference")
    (tmp_path / "tiny.yaml").write_text(config.to_yaml())
    command = [sys.executable, "-m", "ddim_cli", "train", str(tmp_path / "tiny.yaml"), "--no-progress"]
    rng = random.Random(0)
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wanted = rng.randint(1, 6)  # kill once this many checkpoints exist, plus a random slice of a step
    deadline = time.monotonic() + 120
    while len(list_checkpoints(run_dir / "checkpoints")) < wanted and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    for path in list_checkpoints(run_dir / "checkpoints"):
        load_checkpoint(path, training_state=True)  # every listed checkpoint is complete
    resumed = ddim("train", "--resume", run_dir, "--no-progress")  # in this process: one start fewer
    assert resumed.exit_code == 0, resumed.output
    assert_same_weights(list_checkpoints(run_dir / "checkpoints")[-1], reference.checkpoint)
    # A temporary file the killed process left mid-write is gone after the resume.
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("step-")] == []


# --- memory-bounded outputs -------------------------------------------------------------------------
def test_sample_streams_its_outputs_batch_by_batch(finished_run, tmp_path, monkeypatch):
    import numpy as np

    import ddim_cli.sample_files as sample_files

    def outputs(name, batch_size):
        args = ["--n", 7, "--batch-size", batch_size, "--out", tmp_path / f"{name}.png", "--no-progress"]
        args += ["--npz", tmp_path / f"{name}.npz", "--save-latents", tmp_path / f"{name}.npy"]
        result = ddim("sample", finished_run, *args, "--out-dir", tmp_path / name)
        assert result.exit_code == 0, result.output
        return result, np.load(tmp_path / f"{name}.npz")["arr_0"], np.load(tmp_path / f"{name}.npy")

    _, whole, whole_latents = outputs("whole", 7)
    largest = []
    real = sample_files.to_uint8

    def to_uint8(batch):
        largest.append(len(batch))
        return real(batch)

    monkeypatch.setattr(sample_files, "to_uint8", to_uint8)
    monkeypatch.setattr(sample_files, "GRID_LIMIT", 4)
    result, streamed, streamed_latents = outputs("streamed", 3)
    assert max(largest) <= 3  # no output converted more than a batch at a time
    assert np.array_equal(whole, streamed) and np.array_equal(whole_latents, streamed_latents)
    assert len(list((tmp_path / "streamed").iterdir())) == 7
    assert "(the first 4 images)" in result.output
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- resumable ddim sample --------------------------------------------------------------------------
def sample_outputs(folder):
    """`ddim sample` options writing every output into ``folder``: 10 images in batches of 3."""
    options = ["--n", 10, "--batch-size", 3, "--steps", 3, "--eta", 1, "--seed", 5, "--no-progress"]
    return (
        options
        + ["--out", folder / "grid.png", "--out-dir", folder / "pngs"]
        + [
            "--npz",
            folder / "s.npz",
            "--save-latents",
            folder / "x_T.npy",
        ]
    )


def assert_same_outputs(one, two):
    names = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len(names) == 4 + 10  # grid, npz, x_T.npy and its .json record, 10 PNGs: no journal or partial file
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def interrupt_after(monkeypatch, batches):
    """Ctrl-C while the batch after ``batches`` batches is being sampled; returns the image counts sampled."""
    import ddim_cli.jobs.sample as generate

    real, made = generate.generate, []

    def interrupted(loaded, make_eps, spec, x_T, *args, **kwargs):
        if len(made) == batches:
            raise KeyboardInterrupt
        made.append(len(x_T))
        return real(loaded, make_eps, spec, x_T, *args, **kwargs)

    monkeypatch.setattr(generate, "generate", interrupted)
    return made


def test_an_interrupted_sample_run_continues_where_it_stopped(finished_run, tmp_path, monkeypatch):
    assert ddim("sample", finished_run, *sample_outputs(tmp_path / "whole")).exit_code == 0
    folder = tmp_path / "resumed"
    made = interrupt_after(monkeypatch, 2)
    stopped = ddim("sample", finished_run, *sample_outputs(folder))
    assert stopped.exit_code == 130 and made == [3, 3]
    assert sorted(p.name for p in (folder / "pngs").iterdir()) == [".ddim-sample.json"] + [
        f"{i:06d}.png" for i in range(6)
    ]
    assert (folder / ".s.npz.partial.npy").is_file() and not (folder / "s.npz").exists()
    made.clear()
    monkeypatch.undo()
    made = interrupt_after(monkeypatch, 99)
    resumed = ddim("sample", finished_run, *sample_outputs(folder))
    assert resumed.exit_code == 0, resumed.output
    assert "continuing an interrupted run: 6 of 10 images are done" in resumed.output
    assert made == [3, 1]  # only images 6..9 were sampled
    assert_same_outputs(tmp_path / "whole", folder)


def test_a_journal_of_other_settings_is_refused_unless_told_to_start_afresh(finished_run, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    interrupt_after(monkeypatch, 1)
    assert ddim("sample", finished_run, *sample_outputs(folder)).exit_code == 130
    monkeypatch.undo()
    other = ddim("sample", finished_run, *sample_outputs(folder), "--steps", 4)
    error = one_line_error(other)
    assert "holds an unfinished sample run with other settings (steps 3 then, 4 now)" in error
    assert "--no-resume" in error and len(list((folder / "pngs").glob("*.png"))) == 3
    afresh = ddim("sample", finished_run, *sample_outputs(folder), "--steps", 4, "--no-resume")
    assert afresh.exit_code == 0 and "continuing" not in afresh.output
    assert not (folder / "pngs" / ".ddim-sample.json").exists() and len(list((folder / "pngs").iterdir())) == 10


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_kill_9_or_sigterm_during_sampling_then_the_same_command_gives_the_uninterrupted_files(
    finished_run, tmp_path, sig
):
    import json

    more = ["--n", 120, "--batch-size", 2]
    assert ddim("sample", finished_run, *sample_outputs(tmp_path / "whole"), *more).exit_code == 0
    folder = tmp_path / "killed"
    command = [sys.executable, "-m", "ddim_cli", "sample", str(finished_run)]
    command += [str(o) for o in [*sample_outputs(folder), *more]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    journal, deadline = folder / "pngs" / ".ddim-sample.json", time.monotonic() + 120
    rng = random.Random(int(sig))
    wanted = rng.randint(2, 40)  # kill once this many images are done, plus a random slice of a batch

    def done() -> int:
        try:
            return json.loads(journal.read_text())["done"]
        except (FileNotFoundError, ValueError):
            return 0

    while done() < wanted:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.02))
    process.send_signal(sig)
    _, err = process.communicate()
    if sig == signal.SIGTERM:  # a scheduler's stop: one line, as Ctrl-C
        assert process.returncode == 143 and err.strip().splitlines()[-1] == "interrupted by SIGTERM", err
    resumed = ddim(*command[3:])  # the same command, in this process: one start fewer
    assert resumed.exit_code == 0, resumed.output
    assert "note: continuing an interrupted run" in resumed.stderr
    names = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    for name in names:
        assert (folder / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_outputs_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A stop in the middle of writing (here: the writer fails half-way) leaves the old file or
    none under the output's name, and no partial file any image loader would take for one."""
    from ddim_cli.images import save_grid, save_npz, save_pngs

    images = torch.rand(3, 3, 8, 8) * 2 - 1
    save_pngs(images, tmp_path / "pngs")
    save_npz(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "a.npz")
    before = {p.name: p.read_bytes() for p in [*(tmp_path / "pngs").iterdir(), tmp_path / "a.npz"]}

    def half_then_fail(self, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_pngs(-images, tmp_path / "pngs")
    with pytest.raises(KeyboardInterrupt):
        save_grid(images, tmp_path / "grid.png")
    monkeypatch.setattr(np, "savez", lambda handle, *a, **k: (handle.write(b"PK half"), sys.exit(143)))
    with pytest.raises(SystemExit):
        save_npz(np.ones((2, 8, 8, 3), np.uint8), tmp_path / "a.npz")
    after = {p.name: p.read_bytes() for p in [*(tmp_path / "pngs").iterdir(), tmp_path / "a.npz"]}
    assert after == before and not (tmp_path / "grid.png").exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(before)  # no partial file left
