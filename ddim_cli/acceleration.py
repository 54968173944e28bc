"""How the U-Net runs fastest on a device: precision, memory layout and ``torch.compile``.

The ``auto`` settings of ``ddim train``, ``sample``, ``invert`` and ``compare`` resolve here:

- CUDA: bf16 autocast (where the GPU supports bf16), ``channels_last`` and ``torch.compile``:
  tensor-core convolutions want NHWC, and compiling fuses GroupNorm, SiLU and the residual adds.
- CPU: fp32 and eager (a compile build takes a minute or more, so it stays opt-in). For inference
  ``channels_last`` is used on images of 32x32 and larger, where oneDNN's NHWC convolutions were
  5-16% faster per U-Net evaluation on the project's 2-core CPU; at 16x16 it was a wash or slower,
  because PyTorch's channels-last GroupNorm kernel is slow with few channels per group
  (BENCHMARKS.md). CPU training stays NCHW: its backward convolutions gained nothing.
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
Switch = bool | Literal["auto"]


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """``auto``: bf16 autocast on a CUDA device that supports it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def resolve_compile(compile: Switch, device: torch.device) -> bool:
    """``auto``: compile on CUDA only."""
    return device.type == "cuda" if compile == "auto" else bool(compile)


def use_channels_last(device: torch.device, resolution: int, *, training: bool) -> bool:
    """Whether the U-Net's weights and activations should be NHWC (see the module docstring)."""
    if device.type == "cuda":
        return True
    return not training and resolution >= 32


def autocast(precision: Literal["fp32", "bf16"], device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def describe_device(device: torch.device) -> str:
    """The hardware a timing was measured on, for logs: the GPU's name, or the CPU's model, the
    vector instructions PyTorch's kernels use on it (AVX2 or AVX512: the same CPU training can run
    2-4x faster with AVX-512) and the threads it uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


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
