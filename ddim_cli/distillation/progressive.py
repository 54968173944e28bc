"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", PD below, Algorithm 2): a student learns to do in one DDIM step what two teacher
DDIM steps do. From ``z_t``, the teacher steps to ``z_t'`` and then ``z_t''`` (t > t' > t'') and the
student's x-target is the data prediction that makes one DDIM step from ``t`` land on ``z_t''``
exactly:

    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

weighted by the truncated SNR ``max(SNR, 1)`` (PD, Section 5: "truncated SNR weighting"). The
student's grid is every other timestep of its teacher's; a round halves the step count.
"""

from __future__ import annotations

import torch

from ddim_cli.distillation.core import X0Model, ddim_step, extended, per_example
from ddim_cli.schedule import timesteps


def halving_rounds(teacher_steps: int, student_steps: int) -> list[int]:
    """The student step counts of each round, from ``teacher_steps`` halved down to
    ``student_steps`` (e.g. 64 -> 4: [32, 16, 8, 4]); a ValueError when halving cannot reach it."""
    counts, steps = [], teacher_steps
    while steps > student_steps and steps % 2 == 0:
        steps //= 2
        counts.append(steps)
    if steps != student_steps or student_steps < 1:
        reachable = []
        steps = teacher_steps
        while steps % 2 == 0:
            steps //= 2
            reachable.append(steps)
        raise ValueError(
            f"--steps {student_steps} cannot be reached by halving the teacher's {teacher_steps} steps; "
            f"choose one of {', '.join(map(str, reachable)) or 'none (an odd step count)'}"
        )
    return counts


def distillation_grid(num_timesteps: int, teacher_steps: int, steps: int) -> torch.Tensor:
    """The timesteps a ``steps``-step student visits: every ``teacher_steps // steps``-th of the
    first teacher's trailing grid (which starts at t = T - 1, PD Appendix and Lin et al. 2023)."""
    grid = timesteps(num_timesteps, teacher_steps, "trailing")
    return grid[:: teacher_steps // steps]


def progressive_target(
    teacher: X0Model,
    z: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_next: torch.Tensor,
    alpha_bars: torch.Tensor,
) -> torch.Tensor:
    """The student's x-target at ``z`` (timestep ``t``): two teacher DDIM steps, ``t -> t_mid ->
    t_next`` (``t_next`` = -1 means the data, alpha_bar = 1), then the x that one DDIM step from
    ``t`` must predict to land where they did (PD, Algorithm 2)."""
    ab = extended(alpha_bars, z)
    ab_t, ab_mid, ab_next = ab[t + 1], ab[t_mid + 1], ab[t_next + 1]
    with torch.no_grad():
        z_mid = ddim_step(z, teacher(z, t), ab_t, ab_mid)
        z_next = ddim_step(z_mid, teacher(z_mid, t_mid), ab_mid, ab_next)
    ratio = per_example(((1 - ab_next) / (1 - ab_t)).sqrt(), z)  # sigma_t'' / sigma_t
    a_t, a_next = per_example(ab_t.sqrt(), z), per_example(ab_next.sqrt(), z)
    return (z_next - ratio * z) / (a_next - ratio * a_t)


def truncated_snr_weight(alpha_bar: torch.Tensor) -> torch.Tensor:
    """``max(SNR, 1)``: PD's weighting of the x-space loss, i.e. the larger of the x and eps errors."""
    return (alpha_bar / (1 - alpha_bar)).clamp(min=1.0)


def progressive_loss(x_student: torch.Tensor, x_target: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-example truncated-SNR-weighted mean squared error in x (PD, Algorithm 2)."""
    per_example = (x_student - x_target).pow(2).flatten(1).mean(1)
    return truncated_snr_weight(alpha_bar.flatten()) * per_example
