"""The device fast paths: what ``auto`` resolves to, and that NHWC runs give the same numbers."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ddim_cli import acceleration
from ddim_cli.acceleration import (
    COMPILE_PAYS_AFTER_S,
    JobSize,
    compile_cache_dir,
    estimated_eager_seconds,
    forward_gflop,
    job_size,
    resolve_compile,
    resolve_precision,
    set_fp32_math,
    use_channels_last,
    use_compile_cache,
)
from ddim_cli.checkpoint import write_weights
from ddim_cli.config import config_from_dict, load_config
from ddim_cli.jobs.sample import sample_to_files
from ddim_cli.models import SamplerSpec, load_model, noise_model
from ddim_cli.train import train
from ddim_cli.unet import UNet

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_auto_means_the_fast_path_on_cuda_and_plain_fp32_on_cpu(monkeypatch, bf16_supported):
    monkeypatch.setattr(acceleration.torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert resolve_precision("auto", CUDA) == ("bf16" if bf16_supported else "fp32")
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_compile("auto", CUDA, 1e6) is True and resolve_compile("auto", CPU, 1e6) is False
    assert use_channels_last(CUDA, 16, training=True) and use_channels_last(CUDA, 16, training=False)
    assert use_channels_last(CPU, 32, training=False) and not use_channels_last(CPU, 16, training=False)
    assert not use_channels_last(CPU, 64, training=True)
    # Explicit choices are kept as they are, on any device.
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CUDA) == "fp32"
    assert resolve_compile(True, CPU) is True and resolve_compile(False, CUDA) is False


def small_config(image_size: int) -> dict:
    return {
        "name": "small",
        "data": {"dataset": "digits", "image_size": image_size, "channels": 3},
        "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [image_size // 2]},
        "diffusion": {"num_timesteps": 50},
    }


def checkpoint(tmp_path, image_size: int, smallest: bool = False):
    raw = small_config(image_size)
    if smallest:  # one level of one block, attention included: every kind of layer, once
        raw["model"].update(ch_mult=[1], attn_resolutions=[image_size])
    config = config_from_dict(raw)
    torch.manual_seed(0)
    weights = UNet(config.unet_config()).state_dict()
    path = tmp_path / f"step-{image_size}.safetensors"
    write_weights(path, 0, config, weights, weights)
    return path


def test_channels_last_gives_the_standard_layouts_numbers(tmp_path):
    path = checkpoint(tmp_path, 32)
    nchw, nhwc = load_model(path), load_model(path)
    eps_nchw = noise_model(nchw, channels_last=False, compile=False)(None)
    eps_nhwc = noise_model(nhwc, channels_last=True, compile=False)(None)
    conv = nhwc.model.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 40])
    with torch.no_grad():
        a, b = eps_nchw(x, t), eps_nhwc(x, t)
    assert b.is_contiguous()  # the sampler's state keeps the standard layout
    assert (a - b).abs().max() < 1e-5 and a.abs().mean() > 0.1


@pytest.mark.parametrize(("image_size", "nhwc"), [(32, True), (16, False)])
def test_auto_layout_on_cpu_follows_the_image_size(tmp_path, image_size, nhwc):
    loaded = load_model(checkpoint(tmp_path, image_size))
    noise_model(loaded)
    weight = loaded.model.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == nhwc
    assert weight.is_contiguous() != nhwc


def test_training_in_channels_last_writes_plain_checkpoints_and_resumes_across_layouts(tmp_path, monkeypatch):
    """The CUDA training layout, run on the CPU: a run started in NCHW (say on a CPU) and resumed
    in channels_last must go on as if it had never stopped, and write contiguous checkpoints."""
    raw = small_config(8)
    raw["data"]["channels"] = 1
    raw["model"]["dropout"] = 0.0  # dropout masks are drawn in memory order, so they differ by layout
    raw["train"] = {"steps": 4, "batch_size": 8, "lr": 0.01, "checkpoint_every": 2, "sample_every": 2, "log_every": 1}
    raw["sample"] = {"steps": 3, "n": 4}
    half = json.loads(json.dumps(raw))
    half["train"]["steps"] = 2
    straight = train(config_from_dict(raw), tmp_path / "straight", device="cpu", progress=False)
    train(config_from_dict(half), tmp_path / "resumed", device="cpu", progress=False)

    monkeypatch.setattr("ddim_cli.train.use_channels_last", lambda *args, **kwargs: True)
    resumed = train(config_from_dict(raw), tmp_path / "resumed", resume=True, device="cpu", progress=False)

    assert "(fp32, channels_last)" in (tmp_path / "resumed" / "train.log").read_text()
    a, b = load_file(straight.checkpoint), load_file(resumed.checkpoint)
    assert a.keys() == b.keys() and all(v.is_contiguous() for v in b.values())
    # Losses, not weights: Adam turns rounding-level gradient differences into lr-sized steps
    # for near-zero gradients. Adam's moments in the wrong layout would change step 4's loss.
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("straight", "resumed")
    ]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


COMPILE_TWICE = """
import sys, torch
import torch._inductor.config
from torch._dynamo.utils import counters
from ddim_cli.models import load_model, noise_model

path = sys.argv[1]
exact = noise_model(load_model(path), precision="fp32", channels_last=False, compile=False)(None)
fast = noise_model(load_model(path), precision="bf16", channels_last=True, compile=True, notify=print)(None)
size = int(sys.argv[2])
x, t = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 700])
# CUDA's build: freezing (CPU only: it prepacks weights into the code) bypasses the graph cache.
with torch.no_grad(), torch._inductor.config.patch(freezing=False):
    a, b = exact(x, t), fast(x, t)
print("dtype", b.dtype, "contiguous", b.is_contiguous())
print("error", float((a - b).abs().max() / a.abs().max()))
print("cache hits", counters["inductor"]["fxgraph_cache_hit"])
"""


def test_the_cuda_fast_path_composes_on_the_cpu_and_its_build_is_cached_across_processes(tmp_path):
    """bf16 autocast + channels_last + torch.compile together, as large CUDA jobs run them; the
    second process loads the first one's build from our cache directory, and each says so."""
    path = checkpoint(tmp_path, 8, smallest=True)  # a build costs seconds per kernel: the fewest layers
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["DDIM_CACHE_DIR"] = str(tmp_path / "cache")
    # Scalar C++ kernels: CUDA builds Triton ones, so the CPU's vector code is not what this checks, and
    # it builds in 20 s instead of 32 (the CPU's own compiled path: test_compiled_model_gives_the_same_images).
    env["TORCHINDUCTOR_VEC_ISA_OK"] = "0"
    command = [sys.executable, "-c", COMPILE_TWICE, str(path), "8"]
    runs = [subprocess.run(command, env=env, capture_output=True, text=True) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "dtype torch.float32 contiguous True" in run.stdout
        error = float(re.search(r"error (\S+)", run.stdout).group(1))
        assert 0 < error < 0.05  # bf16's rounding, not a different function
        build = re.search(r"torch.compile: the U-Net for batch 2 built in (\S+) s \(cache: (.+)\)", run.stdout)
        assert build is not None and build.group(2) == str(tmp_path / "cache" / "inductor")
    assert "cache hits 0" in runs[0].stdout and "cache hits 0" not in runs[1].stdout
    assert any((tmp_path / "cache" / "inductor").iterdir())


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_only_tf32_lets_cuda_round_fp32_math_to_tf32(precision):
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        set_fp32_math(precision, CPU)  # nothing changes for a CPU job
        assert (matmul.allow_tf32, cudnn.allow_tf32) == before
        set_fp32_math(precision, CUDA)
        assert matmul.allow_tf32 == cudnn.allow_tf32 == (precision == "tf32")
        # what inductor and diffusers read keeps working (torch 2.9's fp32_precision on cuDNN breaks it)
        assert torch.get_float32_matmul_precision() == ("high" if precision == "tf32" else "highest")
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def test_auto_compiles_a_cuda_job_only_when_its_eager_time_repays_the_build():
    assert resolve_compile("auto", CUDA, None) is False  # a job of unknown size stays eager
    assert resolve_compile("auto", CUDA, COMPILE_PAYS_AFTER_S - 1) is False
    assert resolve_compile("auto", CUDA, COMPILE_PAYS_AFTER_S) is True
    cifar10 = load_config("configs/cifar10.yaml")
    digits = load_config("configs/digits.yaml")
    # torch.utils.flop_counter's count of one image through each U-Net (issue 34: 12.44 GFLOP)
    assert forward_gflop(cifar10.unet_config()) == pytest.approx(12.4437, abs=1e-4)
    assert forward_gflop(digits.unet_config()) == pytest.approx(0.063869, abs=1e-6)

    def compiles(config, images, calls_per_image, guided=False, batch=64):
        size = job_size(images, calls_per_image, batch, guided=guided)
        return resolve_compile("auto", CUDA, estimated_eager_seconds(config.unet_config(), *size, "bf16"))

    # issue 34's small jobs stay eager; an FID run of 50,000 samples and a real training run compile
    assert not compiles(digits, 16, 20, guided=True)
    assert not compiles(digits, 500, 50, guided=True)
    assert not compiles(cifar10, 256, 50, batch=256)
    assert compiles(cifar10, 50_000, 50, batch=256)
    assert compiles(digits, 50_000, 50, guided=True)  # 40,000 small calls: launch-bound
    assert not compiles(digits, 1100 * 128, 3, batch=128)  # the quickstart's training (3 calls a step)
    assert compiles(cifar10, 800_000 * 128, 3, batch=128)


def test_the_sample_job_tells_the_compile_decision_its_size(tmp_path, monkeypatch):
    sizes = []

    def recording(loaded, **options):
        sizes.append(options["size"])
        return noise_model(loaded, **options)

    monkeypatch.setattr("ddim_cli.jobs.sample.noise_model", recording)
    loaded = load_model(checkpoint(tmp_path, 16))
    sample_to_files(loaded, SamplerSpec("ddim", steps=4), tmp_path / "g.png", count=5, batch_size=2)
    assert sizes == [JobSize(evaluations=5 * 4, calls=3 * 4)]  # 3 batches of 4 steps


def test_the_compile_cache_is_ours_unless_the_user_named_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("DDIM_CACHE_DIR", str(tmp_path / "ours"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_compile_cache() == tmp_path / "ours" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # filled in by an import of inductor
    assert use_compile_cache() == tmp_path / "ours" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users"))
    assert use_compile_cache() == tmp_path / "users"
    monkeypatch.delenv("DDIM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "ddim-cli"


def test_the_device_line_counts_its_threads_in_words():
    import torch

    from ddim_cli.acceleration import describe_device

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert describe_device(torch.device("cpu")).endswith(", 1 thread")
        torch.set_num_threads(2)
        assert describe_device(torch.device("cpu")).endswith(", 2 threads")
    finally:
        torch.set_num_threads(before)
