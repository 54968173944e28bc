"""The device fast paths: what ``auto`` resolves to, and that NHWC runs give the same numbers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ddim_cli import acceleration
from ddim_cli.acceleration import resolve_compile, resolve_precision, use_channels_last
from ddim_cli.checkpoint import write_weights
from ddim_cli.config import config_from_dict
from ddim_cli.models import load_model, noise_model
from ddim_cli.train import train
from ddim_cli.unet import UNet

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_auto_means_the_fast_path_on_cuda_and_plain_fp32_on_cpu(monkeypatch, bf16_supported):
    monkeypatch.setattr(acceleration.torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert resolve_precision("auto", CUDA) == ("bf16" if bf16_supported else "fp32")
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_compile("auto", CUDA) is True and resolve_compile("auto", CPU) is False
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


def checkpoint(tmp_path, image_size: int):
    config = config_from_dict(small_config(image_size))
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


def test_the_cuda_fast_path_composes_on_the_cpu(tmp_path):
    """bf16 autocast + channels_last + torch.compile together, as CUDA runs them by default."""
    path = checkpoint(tmp_path, 32)
    exact = noise_model(load_model(path), precision="fp32", channels_last=False, compile=False)(None)
    fast = noise_model(load_model(path), precision="bf16", channels_last=True, compile=True)(None)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 700])
    with torch.no_grad():
        a, b = exact(x, t), fast(x, t)
    assert b.dtype == torch.float32 and b.is_contiguous()
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()  # bf16's rounding, not a different function
