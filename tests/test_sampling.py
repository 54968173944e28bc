import math
import weakref

import pytest
import torch
from oracles import gaussian_eps_model, mixture_eps_model, ode_solution

import ddim_cli.sampling as sampling_module
from ddim_cli import alpha_bars, classifier_free_guidance, invert, sample, timesteps
from ddim_cli.sampling import ExactInversionReport

F64 = torch.float64
AB = alpha_bars("linear", 1000)
MU, S = 0.5, 0.3


def gaussian_noise(n: int, seed: int, dim: int = 1) -> torch.Tensor:
    return torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


# --- Golden values of single steps, computed by hand -------------------------------------------
# alpha_bar = [0.64, 0.25] at t = [0, 1]; the model always answers eps = 0.5; x_T = 1.
# x0_hat = (1 - sqrt(0.75) * 0.5) / 0.5 = 2 - sqrt(0.75) = 1.1339745962155614.
TWO_STEP_AB = torch.tensor([0.64, 0.25], dtype=F64)
TWO_STEPS = torch.tensor([1, 0])
X0_HAT = 1.1339745962155614


def constant_eps(x, t):
    return torch.full_like(x, 0.5)


def run_two_steps(**kwargs):
    states = []
    out = sample(
        constant_eps,
        torch.ones(1, 1, dtype=F64),
        TWO_STEP_AB,
        TWO_STEPS,
        callback=lambda i, t, x, x0: states.append((i, t, x.item(), x0.item())),
        **kwargs,
    )
    return out.item(), states


def test_golden_deterministic_ddim_steps():
    out, states = run_two_steps(eta=0.0)
    # Step 1: sqrt(0.64) * x0_hat + sqrt(1 - 0.64) * 0.5 = 0.8 * 1.1339745962155614 + 0.3.
    assert states[0] == (0, 1, pytest.approx(1.2071796769724491, abs=1e-15), pytest.approx(X0_HAT, abs=1e-15))
    # Step 2 goes to alpha_bar = 1: x_0 = x0_hat = (1.2071796769724491 - 0.6 * 0.5) / 0.8.
    assert states[1][:2] == (1, 0)
    assert out == pytest.approx(X0_HAT, abs=1e-15)


def test_golden_stochastic_ddim_step():
    z = torch.randn((1, 1), generator=torch.Generator().manual_seed(0), dtype=F64).item()
    out, states = run_two_steps(eta=1.0, generator=torch.Generator().manual_seed(0))
    # sigma = sqrt(0.36 / 0.75) * sqrt(1 - 0.25 / 0.64) = sqrt(0.2925); direction sqrt(0.0675).
    x1 = 0.8 * X0_HAT + math.sqrt(0.0675) * 0.5 + math.sqrt(0.2925) * z
    assert states[0][2] == pytest.approx(x1, abs=1e-14)
    assert out == pytest.approx((x1 - 0.6 * 0.5) / 0.8, abs=1e-14)  # no noise into x_0


@pytest.mark.parametrize(("variance", "std"), [("posterior", math.sqrt(0.2925)), ("beta", math.sqrt(0.609375))])
def test_golden_ddpm_step(variance, std):
    z = torch.randn((1, 1), generator=torch.Generator().manual_seed(3), dtype=F64).item()
    out, states = run_two_steps(method="ddpm", variance=variance, generator=torch.Generator().manual_seed(3))
    # beta = 1 - 0.25 / 0.64 = 0.609375; mean = 0.8 * beta / 0.75 * x0_hat + sqrt(1 - beta) * 0.36 / 0.75 * 1
    #      = 0.65 * x0_hat + 0.3.
    x1 = 0.65 * X0_HAT + 0.3 + std * z
    assert states[0][2] == pytest.approx(x1, abs=1e-14)
    # Last step: alpha_bar_prev = 1 gives mean = x0_hat exactly and no noise.
    assert out == pytest.approx((x1 - 0.6 * 0.5) / 0.8, abs=1e-14)


def test_clip_x0_clamps_the_prediction_but_keeps_the_model_eps():
    states = []
    sample(
        constant_eps,
        torch.full((1, 1), 3.0, dtype=F64),
        TWO_STEP_AB,
        TWO_STEPS,
        clip_x0=True,
        callback=lambda i, t, x, x0: states.append((x.item(), x0.item())),
    )
    assert states[0] == (pytest.approx(0.8 * 1.0 + 0.6 * 0.5, abs=1e-15), 1.0)


# --- The closed-form Gaussian oracle -----------------------------------------------------------
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_over_all_steps_reproduces_the_data_distribution(variance):
    eps_model = gaussian_eps_model(MU, S, AB)
    x0 = sample(
        eps_model,
        gaussian_noise(100_000, 0),
        AB,
        timesteps(1000, 1000),
        method="ddpm",
        variance=variance,
        generator=torch.Generator().manual_seed(1),
    )
    assert abs(x0.mean().item() - MU) < 0.005
    assert abs(x0.std().item() - S) < 0.006


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_reproduces_the_data_distribution_and_improves_with_steps(eta):
    eps_model = gaussian_eps_model(MU, S, AB)
    x_T = gaussian_noise(50_000, 0)
    std_errors = []
    for steps in [10, 100, 1000]:
        x0 = sample(eps_model, x_T, AB, timesteps(1000, steps), eta=eta, generator=torch.Generator().manual_seed(1))
        std_errors.append(abs(x0.std().item() - S))
    assert abs(x0.mean().item() - MU) < 0.01
    assert std_errors[2] < 0.008
    assert std_errors[0] > std_errors[1] > std_errors[2]


def test_ddpm_posterior_is_ddim_with_eta_one():
    eps_model = gaussian_eps_model(MU, S, AB)
    x_T, ts = gaussian_noise(64, 0, dim=3), timesteps(1000, 50, "quad")
    ddpm = sample(eps_model, x_T, AB, ts, method="ddpm", generator=torch.Generator().manual_seed(7))
    ddim = sample(eps_model, x_T, AB, ts, eta=1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ddpm, ddim, rtol=0, atol=1e-12)


def test_deterministic_ddim_converges_to_the_exact_ode_solution_at_first_order():
    eps_model = gaussian_eps_model(MU, S, AB)
    x_T = gaussian_noise(2000, 0)
    errors = {}
    for steps in [50, 100, 200, 1000]:
        ts = timesteps(1000, steps, "linspace")  # always starts at t = 999
        exact = ode_solution(x_T, AB[999].item(), MU, S)
        errors[steps] = (sample(eps_model, x_T, AB, ts) - exact).abs().max().item()
    assert 0.4 < errors[100] / errors[50] < 0.6
    assert 0.4 < errors[200] / errors[100] < 0.6
    assert errors[1000] < 0.008


@pytest.mark.parametrize("spacing", ["uniform", "quad", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 100])
def test_point_mass_data_is_recovered_exactly_for_any_number_of_steps(spacing, steps):
    point = gaussian_eps_model(MU, 0.0, AB)
    x0 = sample(point, gaussian_noise(16, 0, dim=4), AB, timesteps(1000, steps, spacing))
    torch.testing.assert_close(x0, torch.full_like(x0, MU), rtol=0, atol=1e-12)


def test_invert_then_sample_returns_the_input():
    eps_model = gaussian_eps_model(MU, S, AB)
    x0 = MU + S * gaussian_noise(2000, 5)
    mse = {}
    for steps in [100, 200, 1000]:
        ts = timesteps(1000, steps)
        latent = invert(eps_model, x0, AB, ts)
        assert abs(latent.std().item() - 1) < 0.05  # a latent looks like N(0, 1) noise
        mse[steps] = (sample(eps_model, latent, AB, ts) - x0).pow(2).mean().item()
    assert mse[200] < 1.5e-4
    assert mse[1000] < 1e-5
    assert mse[100] > mse[200] > mse[1000]


def test_invert_follows_the_ode_forward():
    # Inverting to t = 999 must land where the exact ODE solution says: run it backwards.
    eps_model = gaussian_eps_model(MU, S, AB)
    x0 = MU + S * gaussian_noise(500, 2)
    latent = invert(eps_model, x0, AB, timesteps(1000, 1000))
    torch.testing.assert_close(ode_solution(latent, AB[999].item(), MU, S), x0, rtol=0, atol=0.01)


# --- Exact (fixed-point) inversion ----------------------------------------------------------------
def mixture_round_trip(steps: int, x0=None, **kwargs) -> tuple[torch.Tensor, list[ExactInversionReport]]:
    """Per-image reconstruction RMS of inverting then sampling data of the two-mode mixture."""
    eps_model = mixture_eps_model((-0.6, 0.6), 0.1, AB)
    if x0 is None:
        x0 = 0.6 * torch.sign(gaussian_noise(300, 7)) + 0.1 * gaussian_noise(300, 8)
    ts = timesteps(1000, steps)
    report: list[ExactInversionReport] = []
    latent = invert(eps_model, x0, AB, ts, report=report, **kwargs)
    return (sample(eps_model, latent, AB, ts) - x0).pow(2).flatten(1).mean(1).sqrt(), report


def test_exact_inversion_error_goes_to_the_tolerance_not_the_step_size():
    plain = {steps: mixture_round_trip(steps)[0].pow(2).mean() for steps in (10, 100)}
    assert plain[10] > 1e-3 and plain[10] > 10 * plain[100]  # plain inversion: an error of the step size
    for tol in (1e-3, 1e-6, 1e-9):
        errors, report = mixture_round_trip(10, exact=True, tol=tol, max_iter=50)
        assert len(report) == len(errors)
        assert all(image.converged and image.reconstruction_rms <= tol for image in report)
        assert float(errors.max()) <= tol  # the promise holds when sampled again
        assert all(image.model_calls >= 1 + 10 + 10 for image in report)  # the first guess, iterations, the check
    assert float(errors.pow(2).mean()) < 1e-18 < float(plain[10]) / 1e12


# Points between the mixture's two modes are unlike its data: there the DDIM map magnifies an error of the
# latent by far more than 1 / sqrt(alpha_bar), so a per-step stopping rule alone stops too early.
BETWEEN_MODES = 0.25 * torch.randn(6, 16, dtype=F64, generator=torch.Generator().manual_seed(3))


def test_a_per_step_rule_alone_stops_early_where_the_map_magnifies_errors(monkeypatch):
    tol = 1e-3
    monkeypatch.setattr(sampling_module, "EXACT_ROUNDS", 1)  # one pass: each step's own residual decides
    errors, report = mixture_round_trip(10, BETWEEN_MODES, exact=True, tol=tol)
    assert float(errors.max()) > 4 * tol  # "converged" steps, a reconstruction far outside the tolerance
    # ... and the report says so, image by image, with the error as sampling gives it.
    assert [image.converged for image in report] == (errors <= tol).tolist()
    torch.testing.assert_close(torch.tensor([image.reconstruction_rms for image in report], dtype=F64), errors)


def test_exact_inversion_checks_the_reconstruction_and_solves_again_where_it_missed():
    tol = 1e-3
    errors, report = mixture_round_trip(10, BETWEEN_MODES, exact=True, tol=tol)
    assert float(errors.max()) <= tol and all(image.converged for image in report)
    assert {image.rounds for image in report} == {1, 2}  # only the images that missed were solved again
    tighter, _ = mixture_round_trip(10, BETWEEN_MODES, exact=True, tol=1e-6)
    assert float(tighter.max()) <= 1e-6


def test_exact_inversion_stops_at_max_iter_and_reports_the_miss(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(sampling_module, "EXACT_ROUNDS", 1)
        first_pass, _ = mixture_round_trip(10, exact=True, tol=1e-14, max_iter=1)
    errors, report = mixture_round_trip(10, exact=True, tol=1e-14, max_iter=1)
    assert bool((errors <= first_pass).all())  # each image keeps its best pass
    # Pass 1: the plain first step's guess (later steps start from the previous noise estimate, free), one
    # iteration per step, then the check; passes 2-4: one iteration per step and the check.
    assert all(image.model_calls == 1 + 10 + 10 + 3 * 2 * 10 and image.rounds == 4 for image in report)
    assert not any(image.converged for image in report)
    torch.testing.assert_close(torch.tensor([image.reconstruction_rms for image in report], dtype=F64), errors)


def test_exact_inversion_of_an_image_does_not_depend_on_its_batch():
    eps_model = mixture_eps_model((-0.6, 0.6), 0.1, AB)
    x0 = 0.6 * torch.sign(gaussian_noise(8, 1, dim=4)) + 0.1 * gaussian_noise(8, 2, dim=4)
    x0[0] = 0.0  # a point far from the data needs more iterations than the others
    ts = timesteps(1000, 10)
    batch = invert(eps_model, x0, AB, ts, exact=True)
    alone = torch.cat([invert(eps_model, x0[i : i + 1], AB, ts, exact=True) for i in range(8)])
    assert torch.equal(batch, alone)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"clip_x0": True}, "clip_x0=False"), ({"max_iter": 0}, "max_iter"), ({"tol": 0.0}, "tol")],
)
def test_exact_inversion_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        invert(constant_eps, torch.ones(2, 1, dtype=F64), AB, timesteps(1000, 3), exact=True, **kwargs)


# --- DPM-Solver++(2M) ---------------------------------------------------------------------------
def ode_error(method, steps, spacing):
    eps_model = gaussian_eps_model(MU, S, AB)
    x_T = gaussian_noise(2000, 0)
    ts = timesteps(1000, steps, spacing, AB)
    exact = ode_solution(x_T, AB[ts[0]].item(), MU, S)
    return (sample(eps_model, x_T, AB, ts, method=method) - exact).abs().max().item()


def test_dpm_solver_at_10_evaluations_beats_ddim_at_20():
    dpm = ode_error("dpm++2m", 10, "logsnr")
    assert dpm <= min(ode_error("ddim", 20, spacing) for spacing in ("uniform", "quad", "linspace", "logsnr"))
    assert dpm < 0.05


def test_dpm_solver_is_second_order_where_ddim_is_first():
    # On quad spacing (fine steps near t = 0) halving the step divides DPM-Solver's error by
    # about 4 (order 2) and DDIM's by about 2.
    dpm = [ode_error("dpm++2m", s, "quad") for s in (20, 40, 80)]
    ddim = [ode_error("ddim", s, "quad") for s in (20, 40, 80)]
    assert dpm[1] / dpm[0] < 0.3 and dpm[2] / dpm[1] < 0.3
    assert 0.4 < ddim[1] / ddim[0] < 0.6


def test_dpm_solver_first_and_last_steps_are_ddim_steps():
    eps_model = gaussian_eps_model(MU, S, AB)
    x_T, ts = gaussian_noise(8, 3), timesteps(1000, 5, "logsnr", AB)

    def states_of(method):
        states = []
        sample(eps_model, x_T, AB, ts, method=method, callback=lambda i, t, x, x0: states.append((x, x0)))
        return states

    ddim, dpm = states_of("ddim"), states_of("dpm++2m")
    torch.testing.assert_close(dpm[0][0], ddim[0][0], rtol=0, atol=1e-12)  # no history yet: a DDIM step
    torch.testing.assert_close(dpm[-1][0], dpm[-1][1], rtol=0, atol=0)  # into x_0: x_0 = x0_hat
    assert not torch.allclose(dpm[2][0], ddim[2][0])  # in between it is a different (second-order) method
    point = gaussian_eps_model(MU, 0.0, AB)  # the point mass is still recovered exactly
    torch.testing.assert_close(
        sample(point, x_T, AB, ts, method="dpm++2m"), torch.full_like(x_T, MU), rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="eta applies"):
        sample(eps_model, x_T, AB, ts, method="dpm++2m", eta=0.5)


# --- Randomness, dtypes, memory ----------------------------------------------------------------
def test_per_image_generators_make_images_independent_of_the_batch():
    eps_model = gaussian_eps_model(MU, S, AB)
    x_T, ts = gaussian_noise(4, 0, dim=8), timesteps(1000, 20)
    full = sample(eps_model, x_T, AB, ts, eta=1.0, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    part = sample(eps_model, x_T[2:], AB, ts, eta=1.0, generator=[torch.Generator().manual_seed(i) for i in (2, 3)])
    torch.testing.assert_close(full[2:], part, rtol=0, atol=0)
    again = sample(eps_model, x_T, AB, ts, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, sample(eps_model, x_T, AB, ts, eta=1.0, generator=torch.Generator().manual_seed(0)))


def test_float32_matches_float64():
    eps_model = gaussian_eps_model(MU, S, AB)
    x_T, ts = gaussian_noise(256, 0, dim=2), timesteps(1000, 50)
    x32 = sample(eps_model, x_T.float(), AB, ts)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), sample(eps_model, x_T, AB, ts), rtol=0, atol=1e-5)


def test_callback_sees_every_step_and_states_are_not_retained():
    eps_model = gaussian_eps_model(MU, S, AB)
    seen, refs = [], []

    def callback(i, t, x, x0):
        seen.append((i, t))
        refs.append(weakref.ref(x))

    ts = timesteps(1000, 25)
    out = sample(eps_model, gaussian_noise(8, 0), AB, ts, callback=callback)
    assert seen == list(enumerate(ts.tolist()))
    # Memory does not grow with the number of steps: only the returned state is still alive.
    assert [r() is not None for r in refs].count(True) == 1 and refs[-1]() is out


def test_sampling_builds_no_autograd_graph():
    weight = torch.tensor(0.1, dtype=F64, requires_grad=True)
    out = sample(lambda x, t: weight * x, gaussian_noise(4, 0), AB, timesteps(1000, 5))
    assert not out.requires_grad


# --- Bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(eta=-0.1), "eta must be"),
        (dict(eta=float("nan")), "eta must be"),
        (dict(eta=3.0), "eta <= "),
        (dict(method="ddpm", eta=0.5), "eta applies"),
        (dict(method="euler"), "unknown method"),
        (dict(method="ddpm", variance="learned"), "unknown variance"),
        (dict(eta=1.0, generator=[torch.Generator()]), "1 generators for a batch of 2"),
    ],
)
def test_bad_sampler_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(constant_eps, torch.ones(2, 1, dtype=F64), AB, timesteps(1000, 10), **kwargs)


@pytest.mark.parametrize(
    ("ab", "ts", "message"),
    [
        (AB, torch.tensor([0, 10]), "strictly decreasing"),
        (AB, torch.tensor([10, 10]), "strictly decreasing"),
        (AB, torch.tensor([1000, 0]), r"\[0, 999\]"),
        (AB, torch.tensor([-1]), r"\[0, 999\]"),
        (AB, torch.tensor([5.0, 1.0]), "integer tensor"),
        (AB, torch.tensor([]), "non-empty"),
        (AB.view(10, 100), torch.tensor([1]), "1-D"),
        (AB.flip(0), torch.tensor([1]), "strictly decreasing and lie in"),
        (torch.tensor([1.0, 0.5]), torch.tensor([1]), "lie in"),
    ],
)
def test_bad_schedules_raise(ab, ts, message):
    with pytest.raises(ValueError, match=message):
        sample(constant_eps, torch.ones(2, 1, dtype=F64), ab, ts)
    with pytest.raises(ValueError, match=message):
        invert(constant_eps, torch.ones(2, 1, dtype=F64), ab, ts)


def test_mismatched_model_output_raises():
    with pytest.raises(ValueError, match="returned shape"):
        sample(lambda x, t: x[:, :1], torch.ones(2, 3, dtype=F64), AB, timesteps(1000, 3))
    with pytest.raises(ValueError, match="floating-point"):
        sample(constant_eps, torch.ones(2, 3, dtype=torch.long), AB, timesteps(1000, 3))


# --- Classifier-free guidance --------------------------------------------------------------------
def test_classifier_free_guidance_combines_one_batched_call():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * 0 + y.view(-1, 1).to(x.dtype)  # eps = the label, so the mix is easy to read

    x, t = torch.zeros(2, 1, dtype=F64), torch.tensor([5, 5])
    guided = classifier_free_guidance(model, torch.tensor([1, 2]), scale=3.0, null_label=10)(x, t)
    torch.testing.assert_close(guided, torch.tensor([[4 * 1 - 3 * 10.0], [4 * 2 - 3 * 10.0]], dtype=F64))
    assert calls == [4]
    plain = classifier_free_guidance(model, torch.tensor([1, 2]), scale=0.0, null_label=10)(x, t)
    torch.testing.assert_close(plain, torch.tensor([[1.0], [2.0]], dtype=F64))
    with pytest.raises(ValueError, match=">= 0"):
        classifier_free_guidance(model, torch.tensor([1]), scale=-1.0, null_label=10)


def test_guidance_rescale_matches_the_conditional_std_per_image():
    def model(x, t, y):  # the null label (10) predicts [2, 2]; class y predicts y * [1, 3]
        pattern = torch.tensor([1.0, 3.0], dtype=F64) * y.view(-1, 1)
        return torch.where((y == 10).view(-1, 1), torch.full_like(pattern, 2.0), pattern)

    x, t, labels = torch.zeros(2, 2, dtype=F64), torch.tensor([5, 5]), torch.tensor([1, 2])
    # w = 1: guided = 2 * cond - null = [0, 4] (std 2) and [2, 10] (std 4); the conditional stds are 1
    # and 2, so matching them halves both: [0, 2] and [1, 5]; phi mixes the two.
    expected = {
        0.0: [[0.0, 4.0], [2.0, 10.0]],
        1.0: [[0.0, 2.0], [1.0, 5.0]],
        0.5: [[0.0, 3.0], [1.5, 7.5]],
    }
    for phi, values in expected.items():
        guided = classifier_free_guidance(model, labels, scale=1.0, null_label=10, rescale=phi)(x, t)
        torch.testing.assert_close(guided, torch.tensor(values, dtype=F64))
    # A constant guided output has no spread to match and is left as it is.
    flat = classifier_free_guidance(lambda x, t, y: x * 0 + y.view(-1, 1), labels, 1.0, null_label=10, rescale=1.0)
    torch.testing.assert_close(flat(x, t), torch.tensor([[-8.0, -8.0], [-6.0, -6.0]], dtype=F64))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        classifier_free_guidance(model, labels, scale=1.0, null_label=10, rescale=1.5)


# --- The U-Net as the noise model ----------------------------------------------------------------
def test_unet_drives_sample_and_invert_end_to_end():
    from ddim_cli import UNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8, num_classes=2)
    model = UNet(config).eval()
    ab, ts = alpha_bars("cosine", 50), timesteps(50, 5, "trailing")
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    guided = classifier_free_guidance(model, torch.tensor([0, 1]), scale=2.0, null_label=config.num_classes)
    x0 = sample(guided, x_T, ab, ts, clip_x0=True)
    assert x0.shape == x_T.shape and x0.dtype == torch.float32 and bool(x0.abs().le(1).all())
    assert torch.equal(x0, sample(guided, x_T, ab, ts, clip_x0=True))
    latent = invert(model, x0, ab, ts)
    assert latent.shape == x_T.shape and bool(torch.isfinite(latent).all())
