"""Progressive, consistency and DMD distillation (ddim_cli.distillation) against closed-form oracles."""

import math

import pytest
import torch
from oracles import gaussian_model, mixture_eps_model, ode_solution

from ddim_cli import distillation as d
from ddim_cli.parameterization import consistency_scalings, x0_and_eps
from ddim_cli.sampling import sample
from ddim_cli.schedule import alpha_bars, timesteps

AB = alpha_bars("linear", 1000)
COSINE = alpha_bars("cosine", 1000)


def x0_model_of(eps_model, table):
    """An eps model as the data predictor the distillation code takes."""

    def x0_model(z, t):
        return d.x0_from_output(eps_model(z, t), z, table.to(z.device)[t], "eps")

    return x0_model


def at(value: int, n: int) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_the_data_prediction_matches_the_samplers_and_inverts(prediction):
    z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    output = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    levels = torch.tensor([0.9, 0.5, 0.1, 0.99, 0.3], dtype=torch.float64)
    x0 = d.x0_from_output(output, z, levels, prediction)
    for i, level in enumerate(levels.tolist()):
        assert torch.allclose(x0[i], x0_and_eps(output[i], z[i], level, prediction)[0], atol=1e-12)
    assert torch.allclose(d.output_from_x0(x0, z, levels, prediction), output, atol=1e-10)


def test_halving_rounds_and_their_errors():
    assert d.halving_rounds(64, 4) == [32, 16, 8, 4]
    assert d.halving_rounds(48, 3) == [24, 12, 6, 3]
    assert d.halving_rounds(8, 8) == []
    with pytest.raises(
        ValueError,
        match="--steps 3 cannot be reached by halving the teacher's 64 steps; choose one of 32, 16, 8, 4, 2, 1",
    ):
        d.halving_rounds(64, 3)
    with pytest.raises(ValueError, match="choose one of"):
        d.halving_rounds(64, 128)


@pytest.mark.parametrize("steps", [32, 16, 8, 4, 2, 1])
def test_every_round_grid_is_the_trailing_grid_of_its_step_count(steps):
    # So a student samples with plain DDIM, --skip trailing --steps N, on the grid it learned.
    grid = d.distillation_grid(1000, 64, steps)
    assert grid.tolist() == timesteps(1000, steps, "trailing").tolist()
    assert int(grid[0]) == 999


@pytest.mark.parametrize("last_pair", [False, True])
def test_the_progressive_target_lands_where_two_teacher_ddim_steps_land(last_pair):
    """PD Algorithm 2 on the nonlinear mixture oracle, in float64: one DDIM step from z_t with the
    x-target reaches the point that two teacher DDIM steps reach (sample() computes those)."""
    eps_model = mixture_eps_model((-0.8, 0.1, 0.9), 0.2, AB)
    teacher = x0_model_of(eps_model, AB)
    grid = timesteps(1000, 8, "trailing")  # the teacher's: 999, 874, ..., 124
    i = 6 if last_pair else 2
    t, t_mid = int(grid[i]), int(grid[i + 1])
    t_next = -1 if last_pair else int(grid[i + 2])
    z = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1.3
    target = d.progressive_target(teacher, z, at(t, 64), at(t_mid, 64), at(t_next, 64), AB)

    visited = [t, t_mid] + ([] if last_pair else [t_next])
    after = {}
    end = sample(eps_model, z, AB, torch.tensor(visited), callback=lambda k, _t, x, _x0: after.setdefault(k, x))
    two_steps = end if last_pair else after[1]
    level_next = torch.tensor(1.0, dtype=torch.float64) if last_pair else AB[t_next]
    one_step = d.ddim_step(z, target, AB[t], level_next)
    assert torch.allclose(one_step, two_steps, atol=1e-10, rtol=0)
    # A student equal to the two-step map has zero loss; the teacher's own one-step x does not.
    student = (two_steps - (1 - level_next).sqrt() / (1 - AB[t]).sqrt() * z) / (
        level_next.sqrt() - (1 - level_next).sqrt() / (1 - AB[t]).sqrt() * AB[t].sqrt()
    )
    assert float(d.progressive_loss(student, target, AB[at(t, 64)]).max()) < 1e-18
    assert float(d.progressive_loss(teacher(z, at(t, 64)), target, AB[at(t, 64)]).mean()) > 1e-6


def test_the_truncated_snr_weight_is_max_of_snr_and_one():
    levels = torch.tensor([0.1, 0.5, 0.8, 0.99], dtype=torch.float64)
    assert torch.allclose(d.truncated_snr_weight(levels), torch.tensor([1.0, 1.0, 4.0, 99.0], dtype=torch.float64))


# --- consistency ------------------------------------------------------------------------------------
def exact_consistency(mu: float, s: float, table: torch.Tensor):
    """The exact consistency function of N(mu, s^2) data: the DDIM ODE's point at t_min = 0
    (tests/oracles.py: xbar - mu scales as sqrt(s^2 + sigma^2))."""
    sigma_min2 = float((1 - table[0]) / table[0])

    def f(z, t):
        ab = table.to(z)[t].view(-1, *([1] * (z.dim() - 1)))
        xbar = z / ab.sqrt()
        xbar_min = mu + (xbar - mu) * math.sqrt(s**2 + sigma_min2) / (s**2 + (1 - ab) / ab).sqrt()
        return math.sqrt(float(table[0])) * xbar_min

    return f


def student_for(f, table):
    """The data predictor whose consistency function is ``f`` (c_out > 0 away from t_min)."""

    def x0_model(z, t):
        c_skip, c_out = consistency_scalings(t)
        c_skip, c_out = (c.to(z).view(-1, *([1] * (z.dim() - 1))) for c in (c_skip, c_out))
        return (f(z, t) - c_skip * z) / c_out.clamp(min=1e-300)

    return x0_model


def test_the_boundary_condition_holds_exactly_at_the_smallest_time():
    c_skip, c_out = consistency_scalings(torch.tensor([0]))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def anything(x, t):
        return torch.full_like(x, 123.0)

    assert torch.equal(d.consistency_function(anything, z, at(0, 4)), z)
    c_skip, c_out = consistency_scalings(torch.tensor([999]))
    assert float(c_skip) < 1e-6 and float(c_out) > 0.999999
    assert torch.equal(d.consistency_grid(1000, 4), torch.tensor([999, 749, 499, 249, 0]))


def test_away_from_the_smallest_time_f_is_the_data_prediction():
    """A student initialised from its teacher starts as the teacher's x_hat at every time it
    visits after t_min (with CM's sigma-based Delta, c_skip would be 0.59 at t = 249 here)."""
    z = torch.randn(64, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    teacher = gaussian_model(0.3, 0.5, COSINE, "x0")
    for t in (1, 30, 249, 499, 999):
        x_hat = teacher(z, at(t, 64))
        gap = (d.consistency_function(teacher, z, at(t, 64)) - x_hat).abs().max()
        assert gap <= 0.003 * (z.abs().max() + x_hat.abs().max())


def test_the_consistency_target_of_the_exact_function_is_its_own_value_up_to_the_ddim_step():
    """With point-mass data DDIM is exact, so the target equals the student's value; for a
    Gaussian the mismatch is one DDIM step's local error, O(h^2): a quarter when h halves."""
    z = torch.randn(256, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def mismatch(mu, s, gap):
        exact = exact_consistency(mu, s, AB)
        student = student_for(exact, AB)
        teacher = gaussian_model(mu, s, AB, "x0")
        t, t_prev = at(600, 256), at(600 - gap, 256)
        x = AB[600].sqrt() * 0.4 + (1 - AB[600]).sqrt() * z
        target = d.consistency_target(teacher, student, x, t, t_prev, AB)
        return float(d.pseudo_huber(d.consistency_function(student, x, t), target).mean()), (
            d.consistency_function(student, x, t) - target
        ).abs().max()

    assert mismatch(0.4, 0.0, 100)[1] < 1e-10
    coarse, fine = mismatch(0.3, 0.5, 40)[1], mismatch(0.3, 0.5, 20)[1]
    assert 0 < fine < coarse
    assert 3.2 < coarse / fine < 4.8
    assert mismatch(0.3, 0.5, 40)[0] > 0  # the pseudo-Huber loss sees it


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
    a = torch.zeros(2, 3, 32, 32)
    c = 0.00054 * math.sqrt(3 * 32 * 32)
    near = torch.full_like(a, 1e-4)
    far = torch.full_like(a, 1.0)
    squared_norm = 1e-8 * 3 * 32 * 32
    assert torch.allclose(d.pseudo_huber(near, a), torch.full((2,), squared_norm / (2 * c)), rtol=1e-2)
    assert torch.allclose(d.pseudo_huber(far, a), torch.full((2,), math.sqrt(3 * 32 * 32) - c), rtol=1e-4)


@pytest.mark.parametrize("times", [[999], [999, 499], [999, 749, 499, 249]])
def test_consistency_sampling_with_the_exact_function_draws_the_data(times):
    mu, s = 0.3, 0.5
    exact = exact_consistency(mu, s, AB)
    student = student_for(exact, AB)
    x_T = torch.randn(40000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    times = torch.tensor(times)
    x = sample(
        student, x_T, AB, times, method="consistency", prediction="x0", generator=torch.Generator().manual_seed(6)
    )
    # f maps to t_min = 0: N(a0 mu, a0^2 s^2 + 1 - a0); up to 3.5 standard errors of 40000 draws.
    a0 = math.sqrt(float(AB[0]))
    mean, std = a0 * mu, math.sqrt(a0**2 * s**2 + 1 - a0**2)
    assert abs(float(x.mean()) - mean) < 3.5 * std / 200
    assert abs(float(x.std()) - std) < 3.5 * std / 200 / math.sqrt(2) + 2e-3


def gaussian_x0(mean: float, var: float, ab: torch.Tensor):
    """E[x | x_t] for x ~ N(mean, var): the exact data prediction of a 1-D Gaussian's score."""

    def x0(z, t):
        a, s2 = ab[t].sqrt().view(-1, 1), (1 - ab[t]).view(-1, 1)
        return mean + a * var / (a * a * var + s2) * (z - a * mean)

    return x0


def test_dmd_loss_has_dmds_gradient_and_matches_a_gaussian_generator_to_the_data():
    from ddim_cli.distillation.dmd import distribution_matching_loss

    x = torch.randn(5, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(5, 1, 2, 2, dtype=torch.float64), torch.randn(5, 1, 2, 2, dtype=torch.float64)
    distribution_matching_loss(x, real, fake).backward()
    scale = (x - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(x.grad, (fake - real) / scale / x.numel())  # DMD Eq. 7 and 8, over the mean's numel

    # G(z) = a z + b against data N(0.3, 0.5^2) in 16 independent coordinates, with both scores exact
    # (the fake one of G's own current distribution, as a perfectly trained fake score would be): G
    # converges to the data, where the two scores agree and the gradient vanishes. Each sample has 16
    # coordinates because DMD's weight 1 / mean|x - real| has no finite mean for a single coordinate:
    # one-number samples gave a heavy-tailed gradient whose end point depended on the CPU's noise stream.
    generator = torch.Generator().manual_seed(0)
    a, b = (
        torch.tensor(1.0, dtype=torch.float64, requires_grad=True),
        torch.tensor(-0.5, dtype=torch.float64, requires_grad=True),
    )
    optimizer = torch.optim.Adam([a, b], lr=0.01)
    real_x0 = gaussian_x0(0.3, 0.25, AB)
    for _ in range(400):
        z = torch.randn(256, 16, dtype=torch.float64, generator=generator)
        sample = a * z + b
        t = torch.randint(20, 980, (256,), generator=generator)
        noised = AB[t].sqrt().view(-1, 1) * sample.detach() + (1 - AB[t]).sqrt().view(-1, 1) * torch.randn(
            256, 16, dtype=torch.float64, generator=generator
        )
        fake_x0 = gaussian_x0(b.item(), a.item() ** 2, AB)
        optimizer.zero_grad()
        distribution_matching_loss(sample, real_x0(noised, t), fake_x0(noised, t)).backward()
        optimizer.step()
    # Seeds 0-7 end within 1e-8 of the data; swapping real and fake sends G away (a > 10).
    assert abs(b.item() - 0.3) < 1e-4 and abs(abs(a.item()) - 0.5) < 1e-4


def test_dmd_regression_pairs_are_the_teachers_ode_solutions_and_repeat():
    # DMD Eq. 9's pairs: noise and the teacher's ODE end point from it. For N(0.3, 0.5^2) data the end
    # point is closed-form; 16 DPM-Solver++(2M) steps land within 0.04 of it (16 DDIM steps: 0.26 off),
    # and a resumed run draws the same pairs.
    from types import SimpleNamespace

    from ddim_cli.config import Config, DistillConfig
    from ddim_cli.distillation.dmd import teacher_ode_pairs

    def pairs(steps):
        config = Config()
        config.data.channels, config.data.image_size, config.model.prediction = 1, 4, "eps"
        config.distill = DistillConfig(method="dmd", steps=steps, teacher_steps=16, regression_pairs=64)
        table = config.alpha_bars()
        objective = SimpleNamespace(
            config=config,
            x=config.distill,
            device=torch.device("cpu"),
            null=None,
            teacher=gaussian_model(0.3, 0.5, table),
            ab=table,
        )
        return table, teacher_ode_pairs(objective)

    table, (starts, labels, images) = pairs(1)
    noise = starts[:, 0]
    assert labels is None and starts.shape == (64, 1, 1, 4, 4) and images.shape == (64, 1, 4, 4)
    exact = ode_solution(noise.double(), table[-1].item(), 0.3, 0.5)
    assert (images.double() - exact).abs().max() < 0.04
    again = pairs(1)[1]
    assert torch.equal(again[0], starts) and torch.equal(again[2], images)
    # Four steps (times 999, 749, 499, 249): the same noise, and at each later time the trajectory's
    # own point, which the exact ODE carries to the same end as the noise (a point kept one solver
    # step off ends 0.13 away).
    table, (starts4, _, images4) = pairs(4)
    assert starts4.shape == (64, 4, 1, 4, 4) and torch.equal(starts4[:, 0], noise)
    for k, t in enumerate((749, 499, 249), start=1):
        from_point = ode_solution(starts4[:, k].double(), table[t].item(), 0.3, 0.5)
        assert (from_point - exact).abs().max() < 0.04, (k, (from_point - exact).abs().max())
    assert (images4.double() - exact).abs().max() < 0.04


@pytest.mark.parametrize("schedule, zero_terminal", [("linear", False), ("cosine", False), ("cosine", True)])
def test_dmd_trajectory_grid_passes_every_step_time_and_is_the_logsnr_grid_for_one(schedule, zero_terminal):
    from ddim_cli.config import Config
    from ddim_cli.distillation.dmd import trajectory_grid
    from ddim_cli.schedule import timesteps

    config = Config()
    config.diffusion.schedule, config.diffusion.rescale_zero_terminal_snr = schedule, zero_terminal
    table = config.alpha_bars()
    assert torch.equal(trajectory_grid(table, [999], 16), timesteps(1000, 16, "logsnr", table))
    grid = trajectory_grid(table, [999, 749, 499, 249], 16).tolist()
    assert grid == sorted(set(grid), reverse=True) and grid[0] == 999 and grid[-1] == 0
    assert {749, 499, 249} <= set(grid) and 12 <= len(grid) <= 17


def test_dmd_regression_weight_is_constant_or_decays_by_a_cosine_to_zero_at_the_runs_end():
    from types import SimpleNamespace

    from ddim_cli.config import DistillConfig
    from ddim_cli.distillation.dmd import DistributionMatching

    def weights(schedule):
        x = DistillConfig(
            method="dmd", steps=1, round_steps=1000, warmup=20, regression_weight=2.0, regression_schedule=schedule
        )
        return [DistributionMatching.regression_weight_at(SimpleNamespace(x=x), step) for step in (0, 250, 500, 999)]

    assert weights("constant") == [2.0] * 4
    # 1 + cos(pi * s / 1000) over 2 at full weight 2: no warmup (the lr's 20 steps are the lr's)
    cosine = weights("cosine")
    assert cosine == pytest.approx([2.0, 1 + math.cos(math.pi / 4), 1.0, 1 + math.cos(math.pi * 0.999)])
    assert cosine[-1] < 1e-5
