"""What every distillation method shares: the notation of Salimans & Ho 2022 (PD), ``z_t = alpha_t x
+ sigma_t eps`` with ``alpha_t = sqrt(alpha_bar_t)`` and ``sigma_t = sqrt(1 - alpha_bar_t)``; a model
used through its data prediction ``x_hat(z_t)`` (:func:`x0_from_output` converts eps, x0 and v
outputs, per example); the deterministic DDIM step between two levels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddim_cli.parameterization import check_prediction

X0Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> x_hat, per example t


def x0_from_output(output: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The data prediction from a network ``output`` at ``z`` whose signal level is ``alpha_bar``
    (one value per example, broadcast against ``z``). Differentiable, unlike the samplers' form."""
    check_prediction(prediction)
    alpha_bar = per_example(alpha_bar, z)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "x0":
        return output
    if prediction == "v":
        return a * z - s * output  # PD, Section 4: x = alpha z - sigma v
    return (z - s * output) / a  # DDIM paper, Eq. 9


def output_from_x0(x0: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The network output that :func:`x0_from_output` maps to ``x0`` (its inverse)."""
    check_prediction(prediction)
    alpha_bar = per_example(alpha_bar, z)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "x0":
        return x0
    if prediction == "v":
        return (a * z - x0) / s
    return (z - a * x0) / s


def ddim_step(z: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (DDIM paper, Eq. 12 with sigma = 0; PD, Eq. 8) from ``z`` at
    ``alpha_bar`` to ``alpha_bar_next``, given the data prediction ``x0``."""
    alpha_bar, alpha_bar_next = per_example(alpha_bar, z), per_example(alpha_bar_next, z)
    s, s_next = (1 - alpha_bar).sqrt(), (1 - alpha_bar_next).sqrt()
    return alpha_bar_next.sqrt() * x0 + (s_next / s) * (z - alpha_bar.sqrt() * x0)


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (a scalar or one per example) shaped to broadcast against ``like``."""
    values = torch.as_tensor(values, device=like.device)
    if values.dim() == 0:
        return values.to(like.dtype)
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def extended(alpha_bars: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar with the data's level 1.0 in front, so index ``t + 1`` works for t = -1 too."""
    return torch.cat([alpha_bars.new_ones(1), alpha_bars]).to(like.device)
