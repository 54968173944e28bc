"""How the U-Net runs fastest on a device: precision, memory layout and ``torch.compile``.

The ``auto`` settings of ``ddim train``, ``sample``, ``invert`` and ``compare`` resolve here:

- CUDA: bf16 autocast (where the GPU supports bf16) and ``channels_last``: tensor-core
  convolutions want NHWC. ``torch.compile`` (which fuses GroupNorm, SiLU and the residual adds)
  only for jobs big enough to repay its build: see :func:`resolve_compile`.
- CPU: fp32 and eager (a compile build takes a minute or more, so it stays opt-in). For inference
  ``channels_last`` is used on images of 32x32 and larger, where oneDNN's NHWC convolutions were
  5-16% faster per U-Net evaluation on the project's 2-core CPU; at 16x16 it was a wash or slower,
  because PyTorch's channels-last GroupNorm kernel is slow with few channels per group
  (BENCHMARKS.md). CPU training stays NCHW: its backward convolutions gained nothing.

Precision: ``bf16`` is autocast; ``tf32`` keeps fp32 tensors and lets CUDA's matrix units round
their inputs to TF32 (10-bit mantissa) in matmuls and convolutions; ``fp32`` is IEEE fp32
throughout, on CUDA too (PyTorch's own default lets cuDNN convolutions use TF32). On a CPU
``tf32`` and ``fp32`` are the same.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import torch

Precision = Literal["auto", "fp32", "tf32", "bf16"]
Switch = bool | Literal["auto"]

# ``auto`` compiles a CUDA job only when its network evaluations would take at least this long
# eager: a fresh build of a U-Net takes 20-40 s on an H200 (issue 34: 39 s for the CIFAR-10 U-Net,
# most of a 30-34 s `ddim sample` of 16 digits) and the compiled calls save a third to a half of
# the eager time, so a shorter job can only lose.
COMPILE_PAYS_AFTER_S = 60.0
# Sustained eager throughput of the U-Net's network calls on an H100/H200-class GPU, in TFLOP/s,
# by precision: about 20% of the dense peak. An estimate for the decision above, not a promise;
# scripts/gpu_check.sh measures the real figures.
EAGER_TFLOPS = {"bf16": 200.0, "tf32": 100.0, "fp32": 30.0}
# A small U-Net is bound by kernel launches, not FLOPs: a few hundred kernels per forward at
# several microseconds each.
EAGER_SECONDS_PER_CALL = 3e-3


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "tf32", "bf16"]:
    """``auto``: bf16 autocast on a CUDA device that supports it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def set_fp32_math(precision: Literal["fp32", "tf32", "bf16"], device: torch.device) -> None:
    """Whether CUDA's fp32 matmuls and convolutions may use TF32: only for ``tf32`` (``bf16``
    leaves what autocast does not cover in IEEE fp32). Process-wide flags, set by each job for
    its own precision; nothing changes on a CPU."""
    if device.type != "cuda":
        return
    # The allow_tf32 flags, not torch 2.9's fp32_precision: once that is set for cuDNN convolutions,
    # reading torch.backends.cudnn.allow_tf32 raises, and inductor's convolution kernels read it.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


class JobSize(NamedTuple):
    """The network work a job plans: images through the network, and calls (batches) to do it."""

    evaluations: float
    calls: float

    @property
    def per_call(self) -> float:
        """Images through the network per call."""
        return self.evaluations / max(1.0, self.calls)


def job_size(images: int, calls_per_image: float, batch_size: int, *, guided: bool = False) -> JobSize:
    """``images`` taken through ``calls_per_image`` network calls each, ``batch_size`` at a time
    (classifier-free guidance evaluates two images per image in the same call)."""
    batches = -(-images // max(1, batch_size))
    return JobSize(images * calls_per_image * (2 if guided else 1), batches * calls_per_image)


def resolve_compile(compile: Switch, device: torch.device, eager_seconds: float | None = None) -> bool:
    """``auto``: compile on CUDA when the job's network calls would take at least
    :data:`COMPILE_PAYS_AFTER_S` eager (``eager_seconds``, from :func:`estimated_eager_seconds`;
    None, a job of unknown size, stays eager). Never on a CPU."""
    if compile != "auto":
        return bool(compile)
    return device.type == "cuda" and eager_seconds is not None and eager_seconds >= COMPILE_PAYS_AFTER_S


def estimated_eager_seconds(unet_config, evaluations: float, calls: float, precision: str) -> float:
    """The seconds ``calls`` network calls on ``evaluations`` images in all would take eager on an
    H100/H200-class GPU: their FLOPs at :data:`EAGER_TFLOPS`, or their launches where those take
    longer. A training step counts as 3 calls (its backward is twice the forward's work)."""
    flop_seconds = evaluations * forward_gflop(unet_config) / (EAGER_TFLOPS[precision] * 1e3)
    return max(flop_seconds, calls * EAGER_SECONDS_PER_CALL)


def forward_gflop(unet_config) -> float:
    """GFLOP of one image through the U-Net, counted on the meta device (no memory, no compute)."""
    key = repr(unet_config)
    if key not in _FORWARD_GFLOP:
        _FORWARD_GFLOP[key] = _count_forward_gflop(unet_config)
    return _FORWARD_GFLOP[key]


_FORWARD_GFLOP: dict[str, float] = {}  # by the config's repr: counting takes up to a second


def _count_forward_gflop(unet_config) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from ddim_cli.unet import UNet

    size, channels = unet_config.resolution, unet_config.in_channels
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model = UNet(unet_config)
        labels = None if unet_config.num_classes is None else torch.zeros(1, dtype=torch.long)
        model(torch.zeros(1, channels, size, size), torch.zeros(1, dtype=torch.long), labels)
    return counter.get_total_flops() / 1e9


def counted_forward_gflop(model: torch.nn.Module, unet_config) -> float:
    """GFLOP of one image through ``model`` (a U-Net on the CPU): its convolutions' and linear
    layers' multiply-adds, counted by hooks during one forward pass of one image. Attention's two
    matmuls are left out (a few percent at the small resolutions it runs at). A millisecond or so
    for a small model, where :func:`forward_gflop` first imports dynamo (about a second)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output.numel() * kernel
        elif isinstance(module, torch.nn.Linear):
            total += 2 * output.numel() * module.in_features

    hooks = [
        m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    size, device = unet_config.resolution, next(model.parameters()).device
    labels = None if unet_config.num_classes is None else torch.zeros(1, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            model(
                torch.zeros(1, unet_config.in_channels, size, size, device=device),
                torch.zeros(1, device=device),
                labels,
            )
    finally:
        for hook in hooks:
            hook.remove()
    return total / 1e9


def compile_cache_dir() -> Path:
    """Where compiled kernels and graphs are kept between runs: ``$DDIM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ddim-cli``, else ``~/.cache/ddim-cli`` (PyTorch's own default is under
    /tmp, which clusters clear between jobs)."""
    if os.environ.get("DDIM_CACHE_DIR"):
        return Path(os.environ["DDIM_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ddim-cli"


def use_compile_cache() -> Path:
    """Point inductor's on-disk caches (FX graphs, AOTAutograd, Triton and C++ kernels) at
    :func:`compile_cache_dir` unless the user's ``TORCHINDUCTOR_CACHE_DIR`` names another; returns
    the directory in use. Inductor reads it at each build."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Importing parts of torch._inductor fills in its /tmp default: that one is not the user's.
    default = _inductor_default_cache_dir()
    if current is None or (default and os.path.abspath(current) == os.path.abspath(default)):
        current = os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir() / "inductor")
    return Path(current)


def _inductor_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch: only the environment variable is ours to read
        return ""
    return default_cache_dir()


def compile_model(model: torch.nn.Module, notify: Callable[[str], None] | None, what: str = "the U-Net"):
    """``torch.compile(model)`` with the persistent cache, reporting each build in one line: the
    first call of each input shape is when dynamo traces and inductor builds (or loads) the code."""
    cache = use_compile_cache()
    # fp32 is IEEE by choice here (tf32 is its own precision): PyTorch's hint to enable TF32 is noise.
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")
    compiled = torch.compile(model)
    built: set[tuple] = set()

    def call(x: torch.Tensor, *args, **kwargs):
        key = (tuple(x.shape), x.dtype, torch.is_grad_enabled())
        if key in built:
            return compiled(x, *args, **kwargs)
        start = time.perf_counter()
        out = compiled(x, *args, **kwargs)
        built.add(key)
        if notify is not None:
            notify(
                f"torch.compile: {what} for batch {x.shape[0]} built in {time.perf_counter() - start:.1f} s "
                f"(cache: {cache})"
            )
        return out

    return call


def use_channels_last(device: torch.device, resolution: int, *, training: bool) -> bool:
    """Whether the U-Net's weights and activations should be NHWC (see the module docstring)."""
    if device.type == "cuda":
        return True
    return not training and resolution >= 32


def autocast(precision: Literal["fp32", "tf32", "bf16"], device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def describe_device(device: torch.device) -> str:
    """The hardware a timing was measured on, for logs: the GPU's name, or the CPU's model, the
    vector instructions PyTorch's kernels use on it (AVX2 or AVX512: the same CPU training can run
    2-4x faster with AVX-512) and the threads it uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{_cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {threads} thread{'s' if threads > 1 else ''}"


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
