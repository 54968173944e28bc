"""Consistency distillation (Song et al. 2023, "Consistency Models", CM below, Algorithm 2):
``f(x, t) = c_skip(t) x + c_out(t) x_hat(x, t)`` with ``c_skip(t_min) = 1`` and ``c_out(t_min) = 0``
exactly, so ``f(x, t_min) = x`` (CM, Eq. 5 and Appendix C; the coefficients use ``Delta = 10 t`` in
timesteps, as latent consistency models do (Luo et al. 2023), so that away from t_min ``f`` is
``x_hat``, which is already on the data's scale). The target of a pair of adjacent grid times
``t_{n+1} > t_n`` is ``f_target(DDIM step of the teacher from t_{n+1} to t_n)`` with an EMA target
network, and the distance is the pseudo-Huber loss ``sqrt(|a - b|^2 + c^2) - c``, ``c = 0.00054
sqrt(d)`` for d dimensions (Song & Dhariwal 2023, "Improved Techniques for Training Consistency
Models", Section 3.3). Sampling is CM Algorithm 1: ``x = f(x_T, T)``, then for each later time
``tau``: ``x = f(alpha_tau x + sigma_tau z, tau)`` (diffusers' ``LCMScheduler`` steps the same
chain, :mod:`ddim_cli.export`).
"""

from __future__ import annotations

import math

import torch

from ddim_cli.distillation.core import X0Model, ddim_step, per_example
from ddim_cli.parameterization import consistency_scalings
from ddim_cli.schedule import timesteps


def consistency_grid(num_timesteps: int, points: int) -> torch.Tensor:
    """The consistency discretisation, decreasing: ``points`` timesteps from T - 1 on LCM's grid
    (``lcm`` spacing: the trailing grid rounded down), then 0 (t_min, where the boundary condition
    holds)."""
    grid = timesteps(num_timesteps, points, "lcm")
    return grid if int(grid[-1]) == 0 else torch.cat([grid, grid.new_zeros(1)])


def consistency_times(num_timesteps: int, points: int, steps: int) -> torch.Tensor:
    """The times a ``steps``-step consistency sampler visits: the ``lcm`` grid of ``steps``, which
    must lie on the ``points``-point discretisation the student learned (a ValueError naming the
    step counts that do)."""
    grid = set(consistency_grid(num_timesteps, points).tolist())

    def fits(count: int) -> bool:
        return 1 <= count <= points and set(timesteps(num_timesteps, count, "lcm").tolist()) <= grid

    if not fits(steps):
        served = [count for count in range(1, points + 1) if fits(count)]
        raise ValueError(
            f"a student of a {points}-point grid samples with {', '.join(map(str, served))} "
            f"step{'' if served == [1] else 's'}, not {steps}"
        )
    return timesteps(num_timesteps, steps, "lcm")


def consistency_function(x0_model: X0Model, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``f(z, t) = c_skip(t) z + c_out(t) x_hat(z, t)`` (CM, Eq. 5); t_min is timestep 0."""
    c_skip, c_out = consistency_scalings(t)
    c_skip, c_out = per_example(c_skip.to(z.dtype), z), per_example(c_out.to(z.dtype), z)
    return c_skip * z + c_out * x0_model(z, t)


def consistency_target(
    teacher: X0Model,
    target: X0Model,
    z: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alpha_bars: torch.Tensor,
) -> torch.Tensor:
    """``f_target(z_hat, t_prev)`` where ``z_hat`` is one teacher DDIM step from ``z`` at ``t`` to
    ``t_prev`` (CM, Algorithm 2, with DDIM as the ODE solver); no gradient."""
    ab = alpha_bars.to(z.device)
    with torch.no_grad():
        z_hat = ddim_step(z, teacher(z, t), ab[t], ab[t_prev])
        return consistency_function(target, z_hat, t_prev)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example ``sqrt(|a - b|^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` (Song & Dhariwal 2023)."""
    dims = a[0].numel()
    c = 0.00054 * math.sqrt(dims)
    return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt() - c
