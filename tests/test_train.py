import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from ddim_cli.checkpoint import list_checkpoints, load_checkpoint
from ddim_cli.cli import app
from ddim_cli.config import config_from_dict
from ddim_cli.run_loop import LossWindow
from ddim_cli.train import TrainingError, train

TINY = {
    "name": "tiny",
    "data": {"dataset": "digits", "image_size": 8, "channels": 1},
    "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.1},
    "diffusion": {"num_timesteps": 50},
    "train": {
        "steps": 6,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup": 2,
        "log_every": 1,
        "checkpoint_every": 3,
        "sample_every": 3,
        "keep_checkpoints": 5,
        "ema_decay": 0.9,
    },
    "sample": {"steps": 5, "n": 4},
}


def tiny_config(**sections):
    raw = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw)


def run(config, run_dir, resume=False, overwrite=False):
    return train(config, run_dir, resume=resume, overwrite=overwrite, device="cpu", progress=False)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_config_metrics_checkpoints_and_grids(tmp_path):
    result = run(tiny_config(), tmp_path / "run")
    assert result.step == 6
    assert (tmp_path / "run" / "config.yaml").read_text() == tiny_config().to_yaml()
    lines = metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert set(lines[0]) == {"step", "loss", "lr", "grad_norm", "images_per_s"}
    assert lines[0]["lr"] == pytest.approx(5e-4) and lines[1]["lr"] == pytest.approx(1e-3)  # warmup
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-0000003.safetensors",
        "step-0000006.safetensors",
    ]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    checkpoint = load_checkpoint(result.checkpoint, training_state=True)
    assert checkpoint.step == 6 and checkpoint.config == tiny_config()
    assert set(checkpoint.model) == set(checkpoint.ema) and len(checkpoint.model) > 10
    state = checkpoint.training_state  # one file holds weights and training state
    assert state["step"] == 6 and "optimizer" in state
    log = (tmp_path / "run" / "train.log").read_text()  # timings name the CPU's vector instructions
    threads = torch.get_num_threads()
    capability = f", {torch.backends.cpu.get_cpu_capability()}, {threads} thread{'s' if threads > 1 else ''}]"
    assert capability in log.splitlines()[0]
    last = log.splitlines()[-1]
    assert "finished at step 6: 6 steps in" in last and "images/s on " in last and last.endswith(capability[2:-1])
    assert state["data_position"] == {"epoch": 0, "batch_in_epoch": 6, "dataset_size": 1797}


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    run(tiny_config(train={"checkpoint_every": 1, "keep_checkpoints": 2, "sample_every": 0}), tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000005.safetensors", "step-0000006.safetensors"]  # and no temporary files


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    config = tiny_config(
        train={"steps": 8, "checkpoint_every": 4, "sample_every": 0, "label_dropout": 0.2},
        model={"num_classes": 10},
        data={"random_flip": True},
    )
    straight = run(config, tmp_path / "straight")

    half = config_from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "steps": 4}})
    run(half, tmp_path / "resumed")
    (tmp_path / "resumed" / "metrics.jsonl").write_text(
        (tmp_path / "resumed" / "metrics.jsonl").read_text() + '{"step": 5, "loss": 9}\n'  # logged after the crash
    )
    resumed = run(config, tmp_path / "resumed", resume=True)

    assert_same_run_state(straight.checkpoint, resumed.checkpoint)
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "resumed")]


def assert_same_run_state(path_a, path_b):
    """Weights, EMA, optimizer moments and counters bit-identical (torch.save's bytes are not: each
    archive carries a random serialization id)."""
    a, b = load_checkpoint(path_a, training_state=True), load_checkpoint(path_b, training_state=True)
    for x, y in ((a.model, b.model), (a.ema, b.ema)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    state_a, state_b = a.training_state, b.training_state
    assert {k: v for k, v in state_a.items() if k != "optimizer"} == {
        k: v for k, v in state_b.items() if k != "optimizer"
    }
    assert state_a["optimizer"]["param_groups"] == state_b["optimizer"]["param_groups"]
    moments_a, moments_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys()
    assert all(torch.equal(moments_a[i][k], moments_b[i][k]) for i in moments_a for k in moments_a[i])


def test_an_existing_run_is_never_clobbered(tmp_path):
    config = tiny_config(train={"steps": 3, "sample_every": 0})
    run(config, tmp_path / "run")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(TrainingError, match="--resume .* or --overwrite"):
        run(config, tmp_path / "run")
    with pytest.raises(TrainingError, match="not found"):  # a bad dataset is caught before --overwrite deletes
        run(tiny_config(data={"dataset": "cifar10", "root": str(tmp_path / "none")}), tmp_path / "run", overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    with pytest.raises(TrainingError, match="holds no run"):
        run(config, tmp_path / "other", resume=True)
    assert not (tmp_path / "other").exists()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run(tiny_config(train={"steps": 1, "sample_every": 0}), tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-0000001.safetensors"]


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_from_step_0(tmp_path):
    config = tiny_config(train={"steps": 4, "checkpoint_every": 4, "sample_every": 0})
    straight = run(config, tmp_path / "straight")
    crashed = tmp_path / "crashed"  # as a run killed after writing config.yaml and logging two steps
    crashed.mkdir()
    (crashed / "config.yaml").write_text(config.to_yaml())
    (crashed / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n{"step": 2, "loss": 9}\n')
    resumed = run(config, crashed, resume=True)
    assert_same_run_state(straight.checkpoint, resumed.checkpoint)
    assert [m["loss"] for m in metrics(crashed)] == [m["loss"] for m in metrics(tmp_path / "straight")]
    assert (
        "has no checkpoint yet (it stopped before its first): starting it again from step 0"
        in (crashed / "train.log").read_text()
    )


def test_a_non_finite_loss_stops_without_writing_a_checkpoint(tmp_path, monkeypatch):
    import ddim_cli.run_loop as train_module

    real = train_module.build_dataset

    def poisoned(config):
        dataset = real(config)
        dataset.images[:] = float("nan")
        return dataset

    monkeypatch.setattr(train_module, "build_dataset", poisoned)
    with pytest.raises(TrainingError, match="non-finite between steps 1 and 1"):
        run(tiny_config(), tmp_path / "run")
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_dataset_problems_are_errors_before_training(tmp_path):
    with pytest.raises(TrainingError, match="fewer than train.batch_size"):
        run(tiny_config(train={"batch_size": 4096}), tmp_path / "a")
    with pytest.raises(TrainingError, match="no labels"):
        (tmp_path / "imgs").mkdir()
        from PIL import Image

        for i in range(8):
            Image.new("L", (8, 8), i * 30).save(tmp_path / "imgs" / f"{i}.png")
        run(
            tiny_config(data={"dataset": "folder", "root": str(tmp_path / "imgs")}, model={"num_classes": 3}),
            tmp_path / "b",
        )


def test_bf16_autocast_path_trains(tmp_path):
    result = run(tiny_config(train={"steps": 2, "precision": "bf16", "sample_every": 0}), tmp_path / "run")
    assert result.step == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(tmp_path / "run"))


# --- signals and the CLI, in a real process --------------------------------------------------------
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_continues(tmp_path):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(
        tiny_config(train={"steps": 100_000, "sample_every": 0, "checkpoint_every": 100_000}).to_yaml()
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ddim_cli",
            "train",
            str(config_path),
            "--run-dir",
            str(run_dir),
            "--device",
            "cpu",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err  # as a shell reports a process SIGTERM ended
    assert "stopped by SIGTERM at step" in err and f"Resume with: ddim train --resume {run_dir}" in err
    [checkpoint] = list_checkpoints(run_dir / "checkpoints")
    step = load_checkpoint(checkpoint).step
    assert step >= 1 and metrics(run_dir)[-1]["step"] == step

    resumed = CliRunner().invoke(  # in this process: a resume needs no process of its own
        app, ["train", "--resume", str(run_dir), "--set", f"train.steps={step + 2}", "--device", "cpu", "--no-progress"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert f"trained to step {step + 2}" in resumed.stdout
    assert [m["step"] for m in metrics(run_dir)][-3:] == [step, step + 1, step + 2]


# --- two gloo processes ---------------------------------------------------------------------------
def set_rank_environment(rank: int, world: int, port: int) -> None:
    """What torchrun sets for a rank on this machine (LOCAL_WORLD_SIZE: the ranks share the cores)."""
    local = {"LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **local)


def _ddp_worker(rank, world, port, run_dir, out_dir):
    set_rank_environment(rank, world, port)
    import torch.distributed as dist

    from ddim_cli import run_loop

    config = tiny_config(train={"steps": 4, "checkpoint_every": 4, "sample_every": 0, "log_every": 2})
    dist.init_process_group("gloo")
    captured = {}
    real_ddp = run_loop.DistributedDataParallel

    def capture(model):
        captured["model"] = model
        return real_ddp(model)

    run_loop.DistributedDataParallel = capture
    result = train(config, Path(run_dir), device="cpu", progress=False)
    torch.save(captured["model"].state_dict(), Path(out_dir) / f"rank{rank}.pt")
    Path(out_dir, f"rank{rank}.result").write_text(str(result.rank))
    dist.destroy_process_group()


def test_two_gloo_ranks_stay_identical_and_only_rank_0_writes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    checkpoint = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert all(torch.equal(checkpoint.model[k], rank0[k]) for k in rank0)
    assert [m["step"] for m in metrics(tmp_path / "run")] == [2, 4]  # one writer, one line per log step
    assert [(tmp_path / f"rank{r}.result").read_text() for r in (0, 1)] == ["0", "1"]  # rank 0 alone reports


def test_cosine_learning_rate_warms_up_then_decays_to_zero():
    from ddim_cli.train import learning_rate

    cfg = tiny_config(train={"steps": 102, "warmup": 2, "lr": 1e-3, "lr_schedule": "cosine"}).train
    rates = [learning_rate(cfg, step) for step in range(102)]
    assert rates[:2] == pytest.approx([5e-4, 1e-3])
    assert rates[52] == pytest.approx(5e-4)  # half-way through the decay: lr (1 + cos(pi/2)) / 2
    assert rates[101] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(rates[1:], rates[2:], strict=False))
    constant = tiny_config(train={"warmup": 2}).train
    assert [learning_rate(constant, s) for s in range(4)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


def small_extractor(images):
    x = images.float() / 255
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)], 1)


def test_fid_during_training_is_logged_plotted_and_its_reference_cached(tmp_path):
    config = tiny_config(train={"fid_every": 3, "fid_samples": 16}, model={"num_classes": 10})
    train(config, tmp_path / "run", device="cpu", progress=False, fid_extractor=small_extractor)
    fids = [m for m in metrics(tmp_path / "run") if "fid" in m]
    assert [m["step"] for m in fids] == [3, 6] and all(m["fid"] > 0 for m in fids)
    cache = tmp_path / "run" / "fid-reference-small_extractor.npz"
    assert cache.exists() and int(np.load(cache)["count"]) == 1797
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
    # The FID is that of the EMA samples `ddim sample` draws by default, against the training set.
    from ddim_cli.fid import frechet_distance, statistics
    from ddim_cli.images import to_uint8
    from ddim_cli.models import load_model
    from ddim_cli.monitor import sample_ema

    loaded = load_model(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    images = sample_ema(loaded.model, config, config.alpha_bars(), list(range(16)), torch.device("cpu"))
    expected = frechet_distance(statistics(iter([to_uint8(images)]), small_extractor), dict(np.load(cache)))
    assert fids[-1]["fid"] == pytest.approx(expected, rel=1e-6)


def test_a_damaged_fid_reference_cache_is_computed_again_on_resume(tmp_path):
    config = tiny_config(train={"fid_every": 3, "fid_samples": 8, "steps": 3})
    train(config, tmp_path / "run", device="cpu", progress=False, fid_extractor=small_extractor)
    cache = tmp_path / "run" / "fid-reference-small_extractor.npz"
    cache.write_bytes(cache.read_bytes()[:100])  # a damaged disk, or a copy cut short
    longer = tiny_config(train={"fid_every": 3, "fid_samples": 8, "steps": 6})
    with pytest.warns(UserWarning, match="fid-reference-small_extractor.npz.*computing the FID reference"):
        train(longer, tmp_path / "run", resume=True, device="cpu", progress=False, fid_extractor=small_extractor)
    assert [m["step"] for m in metrics(tmp_path / "run") if "fid" in m] == [3, 6]
    assert int(np.load(cache)["count"]) == 1797


def test_fid_without_inception_weights_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    import ddim_cli.fid as fid

    def no_network(*args, **kwargs):
        raise fid.FIDError("could not get the Inception weights (no network)")

    monkeypatch.setattr(fid, "inception_extractor", no_network)
    with pytest.warns(UserWarning, match="FID is skipped") as caught:
        result = run(tiny_config(train={"fid_every": 2, "fid_samples": 4}), tmp_path / "run")
    assert result.step == 6 and len([w for w in caught if "FID" in str(w.message)]) == 1
    assert not any("fid" in m for m in metrics(tmp_path / "run"))


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_a_zero_snr_v_or_x0_model_trains_and_samples_from_pure_noise(tmp_path, prediction):
    from typer.testing import CliRunner

    from ddim_cli.cli import app

    config = tiny_config(
        model={"prediction": prediction},
        diffusion={"rescale_zero_terminal_snr": True},
        train={"loss_weighting": "min_snr", "sample_every": 0},
        sample={"skip": "trailing"},
    )
    result = run(config, tmp_path / "run")
    assert load_checkpoint(result.checkpoint).config.model.prediction == prediction
    assert all(math.isfinite(m["loss"]) for m in metrics(tmp_path / "run"))
    out = CliRunner().invoke(app, ["sample", str(tmp_path / "run"), "--n", "2", "--no-progress"])
    assert out.exit_code == 0, out.output


def test_tensorboard_logs_the_metrics_and_grids_and_a_resume_continues_them(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(train={"tensorboard": True, "steps": 4, "checkpoint_every": 2, "sample_every": 2})
    half = tiny_config(train={"tensorboard": True, "steps": 2, "checkpoint_every": 2, "sample_every": 2})
    run(half, tmp_path / "run")
    run(config, tmp_path / "run", resume=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s"}
    losses = {event.step: event.value for event in events.Scalars("train/loss")}
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses == pytest.approx({m["step"]: m["loss"] for m in metrics(tmp_path / "run")}, rel=1e-6)
    assert [event.step for event in events.Images("samples")] == [2, 4]


def test_tensorboard_without_the_package_is_a_one_line_error_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(TrainingError, match=r"pip install 'ddim-cli\[tensorboard\]'"):
        run(tiny_config(train={"tensorboard": True}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


class _CopyOnItsWay:
    """What a CUDA event of an asynchronous device-to-host copy answers before the copy is done."""

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def _in_flight(window: LossWindow) -> _CopyOnItsWay:
    """Make the newest closed window's values look as they do on CUDA right after the close."""
    event = _CopyOnItsWay()
    window.queued[-1] = (*window.queued[-1][:3], event, *window.queued[-1][4:])
    return event


def test_loss_windows_are_written_once_their_values_arrive_and_a_nan_still_stops_a_checkpoint():
    window = LossWindow(torch.device("cpu"), world=1, batch_size=4, remedy="try a lower train.lr")
    for loss in (1.0, 3.0):
        window.add(torch.tensor(loss))
    window.close(2, 0.1, torch.tensor(0.5))
    first = _in_flight(window)
    assert window.arrived(wait=False) == []  # a plain log step never waits for the GPU
    first.done = True
    [line] = window.arrived(wait=False)
    assert (line["step"], line["loss"], line["lr"], line["grad_norm"]) == (2, 2.0, 0.1, 0.5)
    assert list(line) == ["step", "loss", "lr", "grad_norm", "images_per_s"]  # metrics.jsonl's order

    window.add(torch.tensor(float("nan")))
    window.add(torch.tensor(1.0))
    window.close(4, 0.2, torch.tensor(0.7), student_steps=8)
    _in_flight(window)
    assert window.arrived(wait=False) == []
    with pytest.raises(TrainingError, match="non-finite between steps 3 and 4; .*try a lower train.lr"):
        window.arrived(wait=True)  # as before a checkpoint: waits, and finds the NaN
