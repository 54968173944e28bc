"""Benchmark ddim-cli against diffusers on the same weights: sampling, training, memory.

    python scripts/bench.py                    # CPU: small and CIFAR-10 models, a few minutes
    python scripts/bench.py --compile          # our U-Net under torch.compile (slow to build on CPU)
    python scripts/bench.py --device cuda --batch 256 --train-batch 128

Our side runs as large `ddim sample` and `ddim train` jobs do by default (ddim_cli.acceleration's
"auto": on CUDA bf16 autocast, channels_last and torch.compile; on CPU fp32, eager, channels_last
for 32x32 inference); --precision, --[no-]compile and --[no-]channels-last override that.

diffusers runs twice: as its examples run it (fp32, eager, NCHW) and, with --diffusers-best (the
default on CUDA), given the same bf16 autocast, channels_last and torch.compile as ours.

All sides get the same weights (a random diffusers UNet2DModel of the DDPM family, converted),
the same x_T, batch and DDIM steps; runs alternate in one process and the median of several is
reported. Needs the `bench` extra (diffusers): pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from ddim_cli.acceleration import autocast, resolve_compile, resolve_precision, set_fp32_math, use_channels_last
from ddim_cli.config import config_from_dict
from ddim_cli.convert import _config_from_diffusers, rename_diffusers
from ddim_cli.run_loop import make_optimizer
from ddim_cli.sampling import sample
from ddim_cli.schedule import alpha_bars, timesteps
from ddim_cli.unet import UNet

ARCHITECTURES = {
    "cifar10": dict(  # the DDPM CIFAR-10 model, 35.7M parameters
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    "small": dict(
        sample_size=32,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
}
DDPM_FAMILY = dict(
    in_channels=3,
    out_channels=3,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    attention_head_dim=None,
    act_fn="silu",
    dropout=0.1,
)


def build(name: str, device: torch.device) -> tuple[UNet2DModel, UNet]:
    torch.manual_seed(0)
    theirs = UNet2DModel(**DDPM_FAMILY, **ARCHITECTURES[name])
    config = _config_from_diffusers(json.loads(json.dumps(dict(theirs.config))), None, name)
    ours = UNet(config.unet_config())
    ours.load_state_dict(rename_diffusers(theirs.state_dict(), len(ARCHITECTURES[name]["block_out_channels"])))
    return theirs.to(device), ours.to(device)


def diffusers_best(name: str, device: torch.device) -> tuple[Callable, UNet2DModel]:
    """diffusers' UNet2DModel given our fast path: channels_last, torch.compile, bf16 autocast
    (the same weights as :func:`build`'s)."""
    theirs, _ = build(name, device)
    theirs.to(memory_format=torch.channels_last)
    compiled = torch.compile(theirs)

    def call(x, t):
        with autocast("bf16", device):
            return compiled(x.contiguous(memory_format=torch.channels_last), t).sample

    return call, theirs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_alternating(functions: dict[str, Callable[[], object]], repeats: int, device) -> dict[str, float]:
    """Run each function once to warm up, then ``repeats`` rounds in turn; median seconds each."""
    for f in functions.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, f in functions.items():
            synchronize(device)
            start = time.perf_counter()
            f()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def diffusers_ddim(unet: UNet2DModel, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """What DDIMPipeline does (eta 0, no clipping): the scheduler loop around the UNet."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(steps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def bench_sampling(name: str, args, device: torch.device) -> dict:
    theirs, ours = build(name, device)
    theirs.eval(), ours.eval()
    ab = alpha_bars("linear", 1000)
    ts = timesteps(1000, args.steps, "uniform")
    x_T = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    fast, precision = accelerated(ours, args, device, training=False)
    compile_seconds = None
    if fast is not ours:
        start = time.perf_counter()
        with torch.no_grad(), autocast(precision, device):
            fast(x_T, ts[:1].expand(len(x_T)).to(device))
        compile_seconds = time.perf_counter() - start

    def eps_model(x, t):  # as generate.noise_model builds it
        with autocast(precision, device):
            return fast(x, t).to(dtype=x.dtype, memory_format=torch.contiguous_format)

    def ours_run():
        with torch.no_grad():
            return sample(eps_model, x_T, ab, ts)

    def theirs_run():
        with torch.no_grad():
            return diffusers_ddim(theirs, x_T, args.steps)

    runs = {"ours": ours_run, "diffusers": theirs_run}
    if args.diffusers_best:
        best, _ = diffusers_best(name, device)

        def best_run():
            with torch.no_grad():
                return diffusers_ddim(
                    lambda x, t: _Output(best(x, t.expand(len(x)).to(device)).float()), x_T, args.steps
                )

        runs["diffusers_best"] = best_run
    seconds = median_alternating(runs, args.repeats, device)
    ours_out, their_out = ours_run(), theirs_run()
    # One evaluation at t = 500, where the sampler's 1/sqrt(alpha_bar) amplification does not
    # magnify the difference (a random network's eps is far from the data's, so it is large).
    t_mid = torch.full((len(x_T),), 500, device=device)
    with torch.no_grad():
        eps_difference = (eps_model(x_T, t_mid) - theirs(x_T, t_mid).sample).abs()

    # The sampling loop's own cost: the same loop around a model that costs nothing.
    eps = torch.zeros_like(x_T)
    loop = median_alternating({"loop": lambda: sample(lambda x, t: eps, x_T, ab, ts)}, args.repeats, device)["loop"]

    memory = {}
    for steps in (args.steps, 4 * args.steps):
        reset_peak(device)
        with torch.no_grad():
            sample(eps_model, x_T, ab, timesteps(1000, steps, "uniform"))
        memory[steps] = peak_mib(device)
    return {
        "model": name,
        "parameters_M": sum(p.numel() for p in ours.parameters()) / 1e6,
        "batch": args.batch,
        "steps": args.steps,
        "ours_s": seconds["ours"],
        "diffusers_s": seconds["diffusers"],
        "ratio": seconds["ours"] / seconds["diffusers"],
        "ours_images_per_s": args.batch / seconds["ours"],
        "diffusers_images_per_s": args.batch / seconds["diffusers"],
        "diffusers_best_s": seconds.get("diffusers_best"),
        "ours_s_per_eval": seconds["ours"] / args.steps,
        "loop_overhead_pct": 100 * loop / seconds["ours"],
        "max_abs_diff": float((ours_out - their_out).abs().max()),
        "mean_abs_diff": float((ours_out - their_out).abs().mean()),
        "eps_max_abs_diff": float(eps_difference.max()),
        "eps_mean_abs_diff": float(eps_difference.mean()),
        "peak_mib_by_steps": memory,
        "compile_s": compile_seconds,
    }


def bench_training(name: str, args, device: torch.device) -> dict:
    theirs, ours = build(name, device)
    theirs.train(), ours.train()
    batch = args.train_batch
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn_like(x)
    fast, precision = accelerated(ours, args, device, training=True)
    x_ours = x.contiguous(memory_format=torch.channels_last) if is_channels_last(ours) else x
    # Each side's optimizer as its training code builds it: ours from `ddim train`, diffusers'
    # examples' torch.optim.AdamW with its defaults (weight decay 0 here, so it is Adam).
    optimizers = {
        "ours": make_optimizer(ours, config_from_dict({"train": {"lr": 2e-4}})),
        "diffusers": torch.optim.AdamW(theirs.parameters(), 2e-4, weight_decay=0.0),
    }

    def step(model_call, optimizer):
        loss = torch.nn.functional.mse_loss(model_call().float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def ours_call():  # only our side under autocast: diffusers runs in fp32
        with autocast(precision, device):
            return fast(x_ours, t)

    functions = {
        "ours": lambda: step(ours_call, optimizers["ours"]),
        "diffusers": lambda: step(lambda: theirs(x, t).sample, optimizers["diffusers"]),
    }
    if args.diffusers_best:
        best, best_model = diffusers_best(name, device)
        best_model.train()
        # fused, as ours: the same optimizer kernel on both sides
        best_optimizer = torch.optim.AdamW(best_model.parameters(), 2e-4, weight_decay=0.0, fused=True)
        functions["diffusers_best"] = lambda: step(lambda: best(x, t), best_optimizer)
    seconds = median_alternating(functions, args.repeats, device)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(ours(x, t), noise).backward()
    flops = counter.get_total_flops()
    reset_peak(device)
    functions["ours"]()
    return {
        "model": name,
        "batch": batch,
        "ours_images_per_s": batch / seconds["ours"],
        "diffusers_images_per_s": batch / seconds["diffusers"],
        "diffusers_best_images_per_s": batch / seconds["diffusers_best"] if "diffusers_best" in seconds else None,
        "ratio": seconds["ours"] / seconds["diffusers"],
        "train_flops_per_image_G": flops / batch / 1e9,
        "ours_tflops": flops / seconds["ours"] / 1e12,
        "peak_mib": peak_mib(device),
    }


def accelerated(ours: UNet, args, device: torch.device, *, training: bool) -> tuple[torch.nn.Module, str]:
    """Our U-Net as ddim train/sample run it: layout (in place), compiled or not, and precision."""
    channels_last = args.channels_last
    if channels_last is None:
        channels_last = use_channels_last(device, 32, training=training)
    if channels_last:
        ours.to(memory_format=torch.channels_last)
    fast = ours
    if compile_ours(args, device):
        torch._inductor.config.freezing = device.type == "cpu" and not training  # prepacked CPU weights
        fast = torch.compile(ours)
    return fast, resolve_precision(args.precision, device)


def compile_ours(args, device: torch.device) -> bool:
    """--[no-]compile, else as a job large enough to repay the build runs: compiled on CUDA."""
    return resolve_compile(device.type == "cuda" if args.compile is None else args.compile, device)


def describe_ours(args, device: torch.device) -> str:
    compiled = compile_ours(args, device)
    layouts = [
        f"{'NHWC' if use_channels_last(device, 32, training=training) else 'NCHW'} {what}"
        for what, training in (("sampling", False), ("training", True))
    ]
    if args.channels_last is not None:
        layouts = ["NHWC" if args.channels_last else "NCHW"]
    return ", ".join([resolve_precision(args.precision, device), "compiled" if compiled else "eager", *layouts])


def peak_bf16_tflops(args, device: torch.device) -> float | None:
    """Dense bf16 tensor-core peak of known GPUs (vendor data sheets), or --peak-tflops."""
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    known = {"H200": 989.5, "H100 PCIe": 756.0, "H100": 989.5, "A100": 312.0, "L4": 121.0}
    return next((peak for key, peak in known.items() if key in name), None)


def is_channels_last(model: torch.nn.Module) -> bool:
    weight = model.conv_in.weight
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def forward_gflops(name: str) -> float:
    _, ours = build(name, torch.device("cpu"))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ours(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops() / 1e9


class _Output:
    """What diffusers' UNet2DModel returns: the prediction as ``.sample``."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _ratio(a: float, b: float | None) -> str:
    return "" if b is None else f"{a / b:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="small,cifar10", help="comma-separated: small, cifar10")
    parser.add_argument("--batch", type=int, default=8, help="sampling batch")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per sampling run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "tf32", "bf16"], default="auto", help="ours (default: auto)"
    )
    parser.add_argument(
        "--diffusers-best",
        action=argparse.BooleanOptionalAction,
        help="also time diffusers with bf16, channels_last and torch.compile (default: on CUDA)",
    )
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="ours (default: auto)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="ours (default: auto)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for training %% of peak")
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--no-sampling", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.diffusers_best is None:
        args.diffusers_best = device.type == "cuda"
    set_fp32_math(resolve_precision(args.precision, device), device)
    setup = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "ours": describe_ours(args, device),
        "diffusers": "fp32, eager, NCHW" + ("; best: bf16, compiled, NHWC" if args.diffusers_best else ""),
    }
    print(" | ".join(f"{k}: {v}" for k, v in setup.items()))
    results = {"setup": setup, "sampling": [], "training": [], "forward_gflops": {}}
    print(
        "\n| sampling | params | batch x steps | ours s | diffusers s | ours/diffusers | ours img/s | s/eval | loop overhead | max / mean abs diff | one eval: max / mean abs diff | peak MiB (S, 4S) | compile s | diffusers best s | ours/best (time) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        results["forward_gflops"][name] = forward_gflops(name)
        if args.no_sampling:
            continue
        r = bench_sampling(name, args, device)
        results["sampling"].append(r)
        peaks = ", ".join(f"{v:.0f}" for v in r["peak_mib_by_steps"].values())
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        print(
            f"| {name} | {r['parameters_M']:.1f}M | {r['batch']} x {r['steps']} | {r['ours_s']:.3f} | {r['diffusers_s']:.3f} | "
            f"{r['ratio']:.3f} | {r['ours_images_per_s']:.2f} | {r['ours_s_per_eval']:.4f} | {r['loop_overhead_pct']:.2f}% | "
            f"{r['max_abs_diff']:.1e} / {r['mean_abs_diff']:.1e} | {r['eps_max_abs_diff']:.1e} / {r['eps_mean_abs_diff']:.1e} | "
            f"{peaks} | {compile_s} | {_seconds(r['diffusers_best_s'])} | {_ratio(r['ours_s'], r['diffusers_best_s'])} |"
        )
    if not args.no_training:
        print(
            "\n| training | batch | ours img/s | diffusers img/s | ours/diffusers (time) | GFLOP/image (fwd+bwd) | ours TFLOP/s | % of bf16 peak | peak MiB | diffusers best img/s | ours/best (img/s) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        peak = peak_bf16_tflops(args, device)
        for name in args.models.split(","):
            r = bench_training(name, args, device)
            results["training"].append(r)
            r["of_peak_pct"] = None if peak is None else 100 * r["ours_tflops"] / peak
            of_peak = "" if peak is None else f"{r['of_peak_pct']:.1f}%"
            print(
                f"| {name} | {r['batch']} | {r['ours_images_per_s']:.2f} | {r['diffusers_images_per_s']:.2f} | {r['ratio']:.3f} | "
                f"{r['train_flops_per_image_G']:.1f} | {r['ours_tflops']:.3f} | {of_peak} | {r['peak_mib']:.0f} | "
                f"{_seconds(r['diffusers_best_images_per_s'])} | {_ratio(r['ours_images_per_s'], r['diffusers_best_images_per_s'])} |"
            )
    print(
        "\nforward GFLOP per 32x32 image (torch.utils.flop_counter): "
        + ", ".join(f"{k} {v:.2f}" for k, v in results["forward_gflops"].items())
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
