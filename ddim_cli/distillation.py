"""Few-step students of a trained diffusion model: the targets and samplers of progressive
distillation and consistency distillation, over any teacher given as an ``x0_model(x, t)``.

Notation of Salimans & Ho 2022 ("Progressive Distillation for Fast Sampling of Diffusion Models",
PD below): ``z_t = alpha_t x + sigma_t eps`` with ``alpha_t = sqrt(alpha_bar_t)`` and
``sigma_t = sqrt(1 - alpha_bar_t)``; a model is used through its data prediction ``x_hat(z_t)``
(:func:`x0_from_output` converts eps, x0 and v outputs, per example).

Progressive distillation (PD, Algorithm 2): a student learns to do in one DDIM step what two
teacher DDIM steps do. From ``z_t``, the teacher steps to ``z_t'`` and then ``z_t''`` (t > t' > t'')
and the student's x-target is the data prediction that makes one DDIM step from ``t`` land on
``z_t''`` exactly:

    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

weighted by the truncated SNR ``max(SNR, 1)`` (PD, Section 5: "truncated SNR weighting"). The
student's grid is every other timestep of its teacher's; a round halves the step count.

Consistency distillation (Song et al. 2023, "Consistency Models", CM below, Algorithm 2):
``f(x, t) = c_skip(t) x + c_out(t) x_hat(x, t)`` with ``c_skip(t_min) = 1`` and
``c_out(t_min) = 0`` exactly, so ``f(x, t_min) = x`` (CM, Eq. 5 and Appendix C; the coefficients
use ``Delta = 10 t`` in timesteps, as latent consistency models do (Luo et al. 2023), so that
away from t_min ``f`` is ``x_hat``, which is already on the data's scale). The target of a pair of
adjacent grid times ``t_{n+1} > t_n`` is ``f_target(DDIM step of the teacher from t_{n+1} to t_n)``
with an EMA target network, and the distance is the pseudo-Huber loss ``sqrt(|a - b|^2 + c^2) - c``,
``c = 0.00054 sqrt(d)`` for d dimensions (Song & Dhariwal 2023, "Improved Techniques for Training
Consistency Models", Section 3.3). Sampling is CM Algorithm 1: ``x = f(x_T, T)``, then for each
later time ``tau``: ``x = f(alpha_tau x + sigma_tau z, tau)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ddim_cli.parameterization import check_prediction
from ddim_cli.schedule import timesteps

X0Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> x_hat, per example t
METHODS = ("progressive", "consistency")
SIGMA_DATA = 0.5  # the data's standard deviation assumed by c_skip / c_out (CM, Appendix C)
# Delta of c_skip / c_out per timestep (LCM's timestep_scaling): the boundary is a single timestep
# wide, so away from t_min f is the network's own data prediction and a student initialised from
# its teacher starts out as the teacher's x_hat. (CM's Delta = sigma_VE(t) - sigma_VE(t_min) gives
# c_skip 0.59 at sigma_VE 0.42, mixing that much of the noisy z into f: the network then has to
# learn to cancel it, and multistep samples, which visit those times, came out worse than 1-step.)
BOUNDARY_SCALE = 10.0


def x0_from_output(output: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The data prediction from a network ``output`` at ``z`` whose signal level is ``alpha_bar``
    (one value per example, broadcast against ``z``). Differentiable, unlike the samplers' form."""
    check_prediction(prediction)
    alpha_bar = _per_example(alpha_bar, z)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "x0":
        return output
    if prediction == "v":
        return a * z - s * output  # PD, Section 4: x = alpha z - sigma v
    return (z - s * output) / a  # DDIM paper, Eq. 9


def output_from_x0(x0: torch.Tensor, z: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The network output that :func:`x0_from_output` maps to ``x0`` (its inverse)."""
    check_prediction(prediction)
    alpha_bar = _per_example(alpha_bar, z)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "x0":
        return x0
    if prediction == "v":
        return (a * z - x0) / s
    return (z - a * x0) / s


def ddim_step(z: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (DDIM paper, Eq. 12 with sigma = 0; PD, Eq. 8) from ``z`` at
    ``alpha_bar`` to ``alpha_bar_next``, given the data prediction ``x0``."""
    alpha_bar, alpha_bar_next = _per_example(alpha_bar, z), _per_example(alpha_bar_next, z)
    s, s_next = (1 - alpha_bar).sqrt(), (1 - alpha_bar_next).sqrt()
    return alpha_bar_next.sqrt() * x0 + (s_next / s) * (z - alpha_bar.sqrt() * x0)


# --- progressive distillation -----------------------------------------------------------------------
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
    ab = _extended(alpha_bars, z)
    ab_t, ab_mid, ab_next = ab[t + 1], ab[t_mid + 1], ab[t_next + 1]
    with torch.no_grad():
        z_mid = ddim_step(z, teacher(z, t), ab_t, ab_mid)
        z_next = ddim_step(z_mid, teacher(z_mid, t_mid), ab_mid, ab_next)
    ratio = _per_example(((1 - ab_next) / (1 - ab_t)).sqrt(), z)  # sigma_t'' / sigma_t
    a_t, a_next = _per_example(ab_t.sqrt(), z), _per_example(ab_next.sqrt(), z)
    return (z_next - ratio * z) / (a_next - ratio * a_t)


def truncated_snr_weight(alpha_bar: torch.Tensor) -> torch.Tensor:
    """``max(SNR, 1)``: PD's weighting of the x-space loss, i.e. the larger of the x and eps errors."""
    return (alpha_bar / (1 - alpha_bar)).clamp(min=1.0)


def progressive_loss(x_student: torch.Tensor, x_target: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-example truncated-SNR-weighted mean squared error in x (PD, Algorithm 2)."""
    per_example = (x_student - x_target).pow(2).flatten(1).mean(1)
    return truncated_snr_weight(alpha_bar.flatten()) * per_example


# --- consistency distillation ---------------------------------------------------------------------
def consistency_grid(num_timesteps: int, points: int) -> torch.Tensor:
    """The consistency discretisation, decreasing: ``points`` trailing timesteps from T - 1, then 0
    (t_min, where the boundary condition holds)."""
    grid = timesteps(num_timesteps, points, "trailing")
    return grid if int(grid[-1]) == 0 else torch.cat([grid, grid.new_zeros(1)])


def consistency_times(num_timesteps: int, points: int, steps: int) -> torch.Tensor:
    """The times a ``steps``-step consistency sampler visits: the trailing grid of ``steps``, which
    must lie on the ``points``-point discretisation the student learned (a ValueError naming the
    step counts that do)."""
    grid = set(consistency_grid(num_timesteps, points).tolist())

    def fits(count: int) -> bool:
        return 1 <= count <= points and set(timesteps(num_timesteps, count, "trailing").tolist()) <= grid

    if not fits(steps):
        served = [count for count in range(1, points + 1) if fits(count)]
        raise ValueError(
            f"a consistency student of {points} grid points samples with {', '.join(map(str, served))} steps, "
            f"not {steps}"
        )
    return timesteps(num_timesteps, steps, "trailing")


def consistency_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` at timesteps ``t`` (float64): exactly (1, 0) at t_min = 0, and
    ``c_skip < 0.003``, ``c_out > 0.998`` from timestep 1 on (CM, Appendix C, with LCM's
    ``Delta = 10 t`` in timesteps instead of a noise-level difference)."""
    delta = BOUNDARY_SCALE * t.double()
    c_skip = SIGMA_DATA**2 / (delta**2 + SIGMA_DATA**2)
    c_out = delta / (delta**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def consistency_function(x0_model: X0Model, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``f(z, t) = c_skip(t) z + c_out(t) x_hat(z, t)`` (CM, Eq. 5); t_min is timestep 0."""
    c_skip, c_out = consistency_scalings(t)
    c_skip, c_out = _per_example(c_skip.to(z.dtype), z), _per_example(c_out.to(z.dtype), z)
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


def consistency_sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    alpha_bars: torch.Tensor,
    times: Sequence[int] | torch.Tensor,
    *,
    prediction: str = "x0",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (CM, Algorithm 1): ``f`` at the first of ``times`` (decreasing
    training timesteps), then at each next time re-noised to its level with fresh noise. ``model``
    is the student network (its output read as ``prediction``); one call per time."""
    from ddim_cli.sampling import noise_like

    ab = alpha_bars.to(x_T.device)
    times = [int(time) for time in times]
    batch = len(x_T)

    def x0_model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x0_from_output(model(z, t), z, ab[t], prediction)

    with torch.no_grad():
        x = x_T
        for i, time in enumerate(times):
            t = torch.full((batch,), time, dtype=torch.long, device=x_T.device)
            if i:
                level = ab[time].to(x.dtype)
                x = level.sqrt() * x + (1 - level).sqrt() * noise_like(x, generator)
            x = consistency_function(x0_model, x, t)
            if callback is not None:
                callback(i, time, x)
    return x


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (a scalar or one per example) shaped to broadcast against ``like``."""
    values = torch.as_tensor(values, device=like.device)
    if values.dim() == 0:
        return values.to(like.dtype)
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _extended(alpha_bars: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar with the data's level 1.0 in front, so index ``t + 1`` works for t = -1 too."""
    return torch.cat([alpha_bars.new_ones(1), alpha_bars]).to(like.device)
