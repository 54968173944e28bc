"""DDIB and SDEdit over the shared sampler, on closed-form noise models."""

import pytest
import torch
from oracles import gaussian_eps_model, mixture_eps_model

from ddim_cli import alpha_bars, timesteps
from ddim_cli.editing import ddib, sdedit, sdedit_timesteps

AB = alpha_bars("linear", 1000)
F64 = torch.float64


def data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.6 * torch.sign(torch.randn(n, 4, dtype=F64, generator=g)) + 0.1 * torch.randn(n, 4, dtype=F64, generator=g)


def test_ddib_between_equal_models_gives_the_image_back():
    model = mixture_eps_model((-0.6, 0.6), 0.1, AB)
    x0 = data(50, 0)
    edited, latent = ddib(model, model, x0, AB, timesteps(1000, 10), exact=True, tol=1e-9, max_iter=50)
    assert (edited - x0).abs().max() < 1e-7
    assert latent.std() > 0.5  # a noise-like latent, not the image


def test_ddib_maps_between_gaussians_as_their_ode_does():
    # Source N(0, 0.3^2), target N(1, 0.3^2): both flows are affine, and the bridge shifts by 1.
    source, target = gaussian_eps_model(0.0, 0.3, AB), gaussian_eps_model(1.0, 0.3, AB)
    x0 = 0.3 * torch.randn(200, 1, dtype=F64, generator=torch.Generator().manual_seed(1))
    edited, _ = ddib(source, target, x0, AB, timesteps(1000, 200), exact=True, tol=1e-10, max_iter=50)
    # Within the discretisation error of 200 steps and the schedule's nonzero terminal SNR.
    torch.testing.assert_close(edited, x0 + 1.0, rtol=0, atol=0.02)


def test_sdedit_timesteps_start_at_strength_times_T():
    ts = timesteps(1000, 10)  # 900, 800, ..., 0
    assert sdedit_timesteps(ts, 1000, 0.5).tolist() == [499, 400, 300, 200, 100, 0]
    assert sdedit_timesteps(ts, 1000, 1.0).tolist() == [999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert sdedit_timesteps(ts, 1000, 0.0005).tolist() == [0]
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
            sdedit_timesteps(ts, 1000, bad)


def test_sdedit_stays_closer_to_the_image_at_low_strength():
    model = mixture_eps_model((-0.6, 0.6), 0.1, AB)
    x0 = data(400, 2)
    noise = torch.randn(x0.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    ts = timesteps(1000, 50)
    distance = {
        s: (sdedit(model, x0, noise, AB, ts, strength=s, clip_x0=False) - x0).pow(2).mean().item()
        for s in (0.1, 0.5, 1.0)
    }
    assert distance[0.1] < distance[0.5] < distance[1.0]
    assert distance[0.1] < 0.1 < 0.3 < distance[1.0]  # strength 1 forgets the image: a fresh sample
