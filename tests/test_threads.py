"""CPU threads from the job's work and the cores other processes leave free (issue 37)."""

import subprocess
import sys

import pytest
import torch

from ddim_cli import threads
from ddim_cli.acceleration import JobSize, counted_forward_gflop, forward_gflop
from ddim_cli.models import LoadedModel, noise_model
from ddim_cli.threads import GFLOP_PER_THREAD, busy_cores, choose_threads


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_users_choice_is_taken_as_it_is():
    assert choose_threads(3, 0.001, cores=2, busy=2.0) == 3
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        choose_threads(0)


@pytest.mark.parametrize(
    ("gflop_per_call", "cores", "busy", "processes", "expected"),
    [
        (0.13, 2, 0.0, 1, 1),  # one digit, guided: a second thread only waits at every barrier
        (0.9 * GFLOP_PER_THREAD, 16, 0.0, 1, 1),
        (2.2 * GFLOP_PER_THREAD, 16, 0.0, 1, 2),  # one thread per GFLOP_PER_THREAD of work a call
        (1000.0, 16, 0.0, 1, 16),  # at most the cores
        (None, 8, 0.0, 1, 8),  # training: every free core
        (None, 2, 2.0, 1, 1),  # both cores busy: one thread, never none
        (None, 8, 2.6, 1, 5),  # busy cores counted to the nearest whole core
        (1000.0, 8, 0.0, 2, 4),  # torchrun's two ranks on this machine share its cores
        (None, 2, 0.0, 4, 1),
    ],
)
def test_threads_follow_the_work_and_the_free_cores(gflop_per_call, cores, busy, processes, expected):
    assert choose_threads(None, gflop_per_call, cores=cores, busy=busy, processes=processes) == expected


def test_busy_cores_sees_another_process_spinning():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # started and spinning
        assert busy_cores(0.3) >= 0.7  # a whole core, give or take the kernel's ticks
    finally:
        spinner.kill()
        spinner.wait()


def test_omp_num_threads_is_the_users_choice(monkeypatch, keep_torch_threads):
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(threads, "busy_cores", lambda *a: pytest.fail("measured although the user chose"))
    assert threads.set_threads(None, 0.001) == 2 and torch.get_num_threads() == 2
    assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1  # --threads still wins


def _tiny_loaded(tiny_config):
    from ddim_cli.unet import UNet

    return LoadedModel(UNet(tiny_config.unet_config()).eval(), tiny_config, None, 0)


def test_the_noise_model_gives_a_small_job_one_thread_and_a_big_one_every_free_core(monkeypatch, keep_torch_threads):
    from test_train import tiny_config

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda *a: 0.0)
    loaded = _tiny_loaded(tiny_config())
    torch.set_num_threads(2)
    noise_model(loaded, size=JobSize(evaluations=20.0, calls=20.0))  # one image a call
    assert torch.get_num_threads() == 1
    noise_model(loaded, size=JobSize(evaluations=1e7, calls=1.0))
    assert torch.get_num_threads() == 2
    noise_model(loaded, size=JobSize(evaluations=1e7, calls=1.0), threads=1)
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(threads, "busy_cores", lambda *a: 2.0)  # another process on both cores
    noise_model(loaded, size=JobSize(evaluations=1e7, calls=1.0))
    assert torch.get_num_threads() == 1


def test_the_hook_count_of_a_forward_agrees_with_pytorchs_flop_counter():
    from test_train import tiny_config

    config = tiny_config()
    loaded = _tiny_loaded(config)
    counted, reference = counted_forward_gflop(loaded.model, config.unet_config()), forward_gflop(config.unet_config())
    assert counted == pytest.approx(reference, rel=0.1)  # attention's matmuls left out
    assert counted < reference


def test_train_threads_is_a_config_key():
    from test_train import tiny_config

    from ddim_cli.config import ConfigError

    assert tiny_config(train={"threads": 1}).train.threads == 1
    with pytest.raises(ConfigError, match="train.threads"):
        tiny_config(train={"threads": -1})


def test_training_takes_every_core_whatever_the_load_so_a_resume_repeats_its_arithmetic(
    monkeypatch, keep_torch_threads, tmp_path
):
    # Gradient sums are split by thread: a run resumed on a busier machine with fewer threads would
    # not match an uninterrupted one bit for bit (tests/test_stops.py, test_distill.py check that).
    from test_train import tiny_config

    from ddim_cli.train import train

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda *a: pytest.fail("training measured the load"))
    torch.set_num_threads(1)
    train(tiny_config(train={"steps": 1, "sample_every": 0}), tmp_path / "run", device="cpu", progress=False)
    assert torch.get_num_threads() == 2
    train(
        tiny_config(train={"steps": 1, "sample_every": 0, "threads": 1}), tmp_path / "one", device="cpu", progress=False
    )
    assert torch.get_num_threads() == 1
