"""Prediction targets (eps, x0, v), Min-SNR weights and zero terminal SNR, against closed forms."""

import math

import pytest
import torch
from oracles import gaussian_model, ode_solution

from ddim_cli.parameterization import loss_weights, training_target, x0_and_eps
from ddim_cli.sampling import invert, sample
from ddim_cli.schedule import alpha_bars, rescale_zero_terminal_snr, timesteps

AB = alpha_bars("linear", 1000)
ZERO_SNR = rescale_zero_terminal_snr(AB)
MU, S = 0.3, 0.6


def noisy_pair(alpha_bar: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 3, 8, 8, generator=g)
    eps = eps.double()
    return x0, eps, math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("alpha_bar", [0.9999, 0.5, 1e-4])
def test_each_target_converts_back_to_the_true_x0_and_eps(prediction, alpha_bar):
    x0, eps, x_t = noisy_pair(alpha_bar)
    target = training_target(x0, eps, torch.tensor(alpha_bar, dtype=torch.float64), prediction)
    got_x0, got_eps = x0_and_eps(target, x_t, alpha_bar, prediction)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9 / math.sqrt(alpha_bar))
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9 / math.sqrt(1 - alpha_bar))


def test_v_is_salimans_and_hos_definition_and_defined_at_zero_snr():
    x0, eps, x_t = noisy_pair(0.36)
    v = training_target(x0, eps, torch.tensor(0.36, dtype=torch.float64), "v")
    torch.testing.assert_close(v, 0.6 * eps - 0.8 * x0)  # sqrt(0.36) = 0.6, sqrt(0.64) = 0.8
    x0, eps, x_t = noisy_pair(0.0)  # pure noise: x_t = eps, v = -x0
    got_x0, got_eps = x0_and_eps(-x0, x_t, 0.0, "v")
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        x0_and_eps(eps, x_t, 0.0, "eps")


def test_min_snr_weights_are_hang_et_al_for_each_target():
    ab = torch.tensor([0.0, 0.5, 5 / 6, 0.99], dtype=torch.float64)  # SNR 0, 1, 5, 99
    expected = {
        "eps": torch.tensor([1.0, 1.0, 1.0, 5 / 99], dtype=torch.float64),  # min(SNR, 5) / SNR, 1 at SNR 0
        "x0": torch.tensor([0.0, 1.0, 5.0, 5.0], dtype=torch.float64),  # min(SNR, 5)
        "v": torch.tensor([0.0, 0.5, 5 / 6, 5 / 100], dtype=torch.float64),  # min(SNR, 5) / (SNR + 1)
    }
    for prediction, weights in expected.items():
        torch.testing.assert_close(loss_weights(ab, prediction, "min_snr", 5.0), weights)
        torch.testing.assert_close(loss_weights(ab, prediction, "none"), torch.ones(4, dtype=torch.float64))
    # Every weighted target is the same x0 loss: w_eps |eps err|^2 = w_x0 |x0 err|^2 = w_v |v err|^2.
    x0, eps, x_t = noisy_pair(0.7)
    a = torch.tensor([0.7], dtype=torch.float64)
    wrong_x0 = x0 + 0.1
    wrong = {p: training_target(wrong_x0, (x_t - math.sqrt(0.7) * wrong_x0) / math.sqrt(0.3), a, p) for p in expected}
    truth = {p: training_target(x0, eps, a, p) for p in expected}
    losses = [float(loss_weights(a, p, "min_snr", 5.0) * (wrong[p] - truth[p]).pow(2).mean()) for p in expected]
    assert losses == pytest.approx([losses[1]] * 3, rel=1e-9)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weights(ab, "eps", "snr")


def test_rescaled_schedule_ends_at_zero_snr_and_keeps_its_first_value():
    # Lin et al. Algorithm 1 in closed form: sqrt(ab) shifted to end at 0 and scaled to keep ab[0].
    root = AB.sqrt()
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    torch.testing.assert_close(ZERO_SNR, expected, rtol=0, atol=0)
    assert (
        ZERO_SNR.dtype == torch.float64
        and ZERO_SNR[-1] == 0
        and float(ZERO_SNR[0]) == pytest.approx(float(AB[0]), rel=1e-15)
    )
    assert bool((ZERO_SNR[1:] < ZERO_SNR[:-1]).all())


def test_logsnr_spacing_starts_from_pure_noise_on_a_zero_snr_schedule():
    ts = timesteps(1000, 10, "logsnr", ZERO_SNR)
    assert ts[0] == 999 and len(set(ts.tolist())) == 10 and ts[-1] == 0


@pytest.mark.parametrize("method", ["ddim", "dpm++2m", "ddpm"])
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_every_sampler_works_with_every_target_identically(method, prediction):
    x_T = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = timesteps(1000, 20, "logsnr" if method == "dpm++2m" else "uniform", AB)

    def run(target):
        return sample(
            gaussian_model(MU, S, AB, target),
            x_T,
            AB,
            ts,
            method=method,
            prediction=target,
            generator=torch.Generator().manual_seed(3),
        )

    torch.testing.assert_close(run(prediction), run("eps"), rtol=0, atol=1e-9)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_inversion_is_the_same_whatever_the_target(prediction):
    x_0 = MU + S * torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = timesteps(1000, 50, "uniform")
    latents = invert(gaussian_model(MU, S, AB, prediction), x_0, AB, ts, prediction=prediction)
    torch.testing.assert_close(latents, invert(gaussian_model(MU, S, AB, "eps"), x_0, AB, ts), rtol=0, atol=1e-9)
    back = sample(gaussian_model(MU, S, AB, prediction), latents, AB, ts, prediction=prediction)
    assert float((back - x_0).pow(2).mean()) < 1e-3


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_zero_snr_sampling_from_pure_noise_reaches_the_data_distribution(prediction):
    # From x_T = pure noise at alpha_bar = 0, the exact model's first step predicts x0 = mu; the
    # DDIM ODE then follows the closed form from the next step on, and the samples are N(mu, s^2).
    x_T = torch.randn(20000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = timesteps(1000, 200, "trailing")
    assert ts[0] == 999
    x_0 = sample(gaussian_model(MU, S, ZERO_SNR, prediction), x_T, ZERO_SNR, ts, prediction=prediction)
    assert float(x_0.mean()) == pytest.approx(MU, abs=0.02)
    assert float(x_0.std()) == pytest.approx(S, rel=0.03)
    # One step from pure noise to alpha_bar = 1 lands on the mean.
    first = sample(gaussian_model(MU, S, ZERO_SNR, prediction), x_T, ZERO_SNR, ts[:1], prediction=prediction)
    assert float(first.sub(MU).abs().max()) < 1e-12
    # After the first step (x0 = mu, eps = x_T, Eq. 12) the ODE has a closed form; DDIM converges
    # to it at first order.
    errors = []
    for steps in (100, 200, 400):
        ts = timesteps(1000, steps, "trailing")
        x_0 = sample(gaussian_model(MU, S, ZERO_SNR, prediction), x_T, ZERO_SNR, ts, prediction=prediction)
        ab_next = float(ZERO_SNR[ts[1]])
        x_next = math.sqrt(ab_next) * MU + math.sqrt(1 - ab_next) * x_T
        errors.append(float((x_0 - ode_solution(x_next, ab_next, MU, S)).abs().max()))
    assert errors[2] < 0.02
    assert 1.7 < errors[0] / errors[1] < 2.3 and 1.7 < errors[1] / errors[2] < 2.3


def test_eps_prediction_is_refused_where_alpha_bar_is_zero():
    x_T = torch.randn(2, 1)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sample(gaussian_model(MU, S, ZERO_SNR), x_T, ZERO_SNR, timesteps(1000, 10, "trailing"))
    # Timesteps that skip T-1 are fine, as is an x0 or v model; a negative alpha_bar is not.
    sample(gaussian_model(MU, S, ZERO_SNR), x_T, ZERO_SNR, timesteps(1000, 10, "uniform"))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(gaussian_model(MU, S, AB), x_T, torch.cat([AB[:-1], torch.tensor([-1e-3])]), timesteps(1000, 10))
    with pytest.raises(ValueError, match="unknown prediction"):
        sample(gaussian_model(MU, S, AB), x_T, AB, timesteps(1000, 10), prediction="noise")
