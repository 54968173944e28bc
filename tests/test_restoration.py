"""DDNM, DDNM+ and RePaint on closed-form noise models: consistency, oracles and bad input."""

import math

import pytest
import torch
from oracles import gaussian_eps_model

from ddim_cli import alpha_bars, timesteps
from ddim_cli.restoration import (
    Colorization,
    Composed,
    Denoising,
    Inpainting,
    SuperResolution,
    consistent_in_range,
    mask_preset,
    model_calls,
    restore,
    travel_schedule,
)
from ddim_cli.sampling import sample

AB = alpha_bars("linear", 1000)
F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def degradations():
    known = mask_preset("random:0.4", 8, 8, torch.Generator().manual_seed(0))
    return {
        "mask": Inpainting(known),
        "sr": SuperResolution(2),
        "gray": Colorization(),
        "gray+sr": Composed([Colorization(), SuperResolution(4)]),
        "gray+mask": Composed([Colorization(), Inpainting(mask_preset("bottom-half", 8, 8))]),
    }


@pytest.mark.parametrize("name", list(degradations()))
def test_pseudo_inverse_is_moore_penrose(name):
    A = degradations()[name]
    x, y = rand(2, 3, 8, 8, seed=1), A.degrade(rand(2, 3, 8, 8, seed=2))
    torch.testing.assert_close(A.degrade(A.pinv(A.degrade(x))), A.degrade(x))  # A A+ A = A
    torch.testing.assert_close(A.pinv(A.degrade(A.pinv(y))), A.pinv(y))  # A+ A A+ = A+
    # A+ A is an orthogonal projection: <P x, z> = <x, P z>.
    z = rand(2, 3, 8, 8, seed=3)
    assert math.isclose(float((A.project(x) * z).sum()), float((x * A.project(z)).sum()), rel_tol=1e-10)
    # A+ = A^T / s^2: <A x, y> = <x, A^T y> = s^2 <x, A+ y>.
    s2 = A.singular_value**2
    assert math.isclose(float((A.degrade(x) * y).sum()), s2 * float((x * A.pinv(y)).sum()), rel_tol=1e-10)


def test_singular_values():
    assert SuperResolution(4).singular_value == 0.25
    assert math.isclose(Colorization().singular_value, math.sqrt(0.299**2 + 0.587**2 + 0.114**2))
    # Average pooling: each row averages 16 pixels, norm 1/4; so A^+ y repeats y over the block.
    y = rand(1, 1, 2, 2)
    up = SuperResolution(4).pinv(y)
    assert up.shape == (1, 1, 8, 8) and torch.equal(up[0, 0, :4, :4], y[0, 0, 0, 0].expand(4, 4))
    # Grayscale of a gray RGB image is that gray (weights sum to 1).
    gray = rand(1, 1, 4, 4)
    torch.testing.assert_close(Colorization().degrade(gray.expand(1, 3, 4, 4)), gray)


@pytest.mark.parametrize("method", ["ddnm", "repaint"])
@pytest.mark.parametrize("name", list(degradations()))
def test_noiseless_result_is_consistent_with_the_observation(method, name):
    # Whatever the model (here an arbitrary nonlinear one), the last step lands on A x = y.
    A = degradations()[name]
    y = A.degrade(rand(3, 3, 8, 8, seed=4).clamp(-1, 1))

    def model(x, t):
        return torch.tanh(3 * x.flip(-1)) + 0.01 * t.view(-1, 1, 1, 1)

    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    out = restore(
        model,
        y,
        A,
        AB,
        timesteps(1000, 10),
        rand(3, 3, 8, 8, seed=5),
        method=method,
        eta=0.7,
        jump=2,
        resample=3,
        generator=gens,
    )
    torch.testing.assert_close(A.degrade(out), y, rtol=0, atol=1e-12)
    if method == "ddnm" or name == "mask":  # DDNM projects into [-1, 1]; RePaint's mask keeps y and clipped x0
        assert out.abs().max() <= 1


def test_consistent_in_range_is_the_nearest_image_in_range():
    # One 2x2 block averaging 0.95: three pixels saturate at 1, the fourth takes the rest. Clamping
    # after DDNM's correction (+0.225 each) would give a block averaging 0.89 instead.
    x = torch.tensor([[[[0.9, 0.9], [0.9, -0.5]]]], dtype=F64)
    y = torch.tensor([[[[0.95]]]], dtype=F64)
    got = consistent_in_range(x, y, SuperResolution(2))
    torch.testing.assert_close(got, torch.tensor([[[[1.0, 1.0], [1.0, 0.8]]]], dtype=F64))
    # Far outside the range (an early, noisy estimate) and with every kind of degradation.
    for A in degradations().values():
        x = 4 * rand(3, 3, 8, 8, seed=20)
        y = A.degrade(rand(3, 3, 8, 8, seed=21).clamp(-1, 1))
        got = consistent_in_range(x, y, A)
        assert got.abs().max() <= 1
        torch.testing.assert_close(A.degrade(got), y, rtol=0, atol=1e-12)
        # Other images in [-1, 1] consistent with y are farther from x (per image).
        others = [consistent_in_range(rand(3, 3, 8, 8, seed=s), y, A) for s in (22, 23)]
        distance = (got - x).flatten(1).norm(dim=1)
        for other in others:
            assert bool((distance <= (other - x).flatten(1).norm(dim=1) + 1e-9).all())


@pytest.mark.parametrize("method", ["ddnm", "repaint"])
@pytest.mark.parametrize("name", list(degradations()))
def test_gaussian_oracle_null_space_is_a_plain_ddim_sample(method, name):
    # For data with independent N(mu, s^2) coordinates the exact model is affine and commutes with
    # the projection, so the null space evolves as plain DDIM: the result is A+ y plus the null
    # part of the unconditional sample from the same x_T, exactly.
    A = degradations()[name]
    model = gaussian_eps_model(0.3, 0.5, AB)
    ts = timesteps(1000, 20)
    x_T, y = rand(4, 3, 8, 8, seed=6), A.degrade(rand(4, 3, 8, 8, seed=7))
    out = restore(model, y, A, AB, ts, x_T, method=method, clip_x0=False)
    free = sample(model, x_T, AB, ts)
    torch.testing.assert_close(out, A.pinv(y) + free - A.project(free), rtol=0, atol=1e-10)


def two_template_model(templates: torch.Tensor, alpha_bars: torch.Tensor):
    """The exact noise prediction for data that is one of ``templates`` (K, C, H, W), equally likely."""
    table = alpha_bars.to(F64)

    def model(x, t):
        ab = table[t].view(-1, 1, 1, 1, 1)
        offsets = x.unsqueeze(1) - ab.sqrt() * templates.unsqueeze(0)  # (N, K, C, H, W)
        weights = torch.softmax(-offsets.pow(2).flatten(2).sum(2) / (2 * (1 - ab.view(-1, 1))), dim=1)
        return (weights.view(*weights.shape, 1, 1, 1) * offsets).sum(1) / (1 - ab.view(-1, 1, 1, 1)).sqrt()

    return model


@pytest.mark.parametrize(("method", "resample"), [("ddnm", 1), ("repaint", 1), ("repaint", 4)])
def test_inpainting_completes_the_template_the_known_half_shows(method, resample):
    # The data is one of two random patterns; seeing the top half picks the pattern, so a correct
    # sampler fills the bottom half with the same pattern's bottom half.
    templates = rand(2, 1, 8, 8, seed=8).clamp(-1, 1)
    A = Inpainting(mask_preset("bottom-half", 8, 8))
    n = 64
    truth = torch.arange(n) % 2
    y = A.degrade(templates[truth])
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    out = restore(
        two_template_model(templates, AB),
        y,
        A,
        AB,
        timesteps(1000, 20),
        rand(n, 1, 8, 8, seed=9),
        method=method,
        eta=1.0,
        jump=5,
        resample=resample,
        generator=gens,
    )
    error = (out - templates[truth])[..., 4:, :].abs().flatten(1).amax(1)
    assert float((error < 1e-3).float().mean()) >= 0.95


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize(
    ("method", "A"),
    [
        ("ddnm", Denoising(0.2)),
        ("ddnm", SuperResolution(2, sigma=0.1)),
        ("ddnm", Composed([Colorization()], sigma=0.3)),
        ("ddnm", Inpainting(mask_preset("center", 8, 8))),
        ("repaint", Inpainting(mask_preset("center", 8, 8))),
        ("repaint", SuperResolution(2)),
    ],
)
def test_steps_keep_the_forward_marginals_on_a_point_mass(method, A, eta):
    # With data a single point mu the model is exact and x0_hat = mu; each x_t must then sit at the
    # forward process's mean sqrt(alpha_bar) mu and noise level sqrt(1 - alpha_bar) in every
    # direction. For DDNM+ this checks that lambda and the fresh noise share the step's noise
    # budget with the observation's noise; for RePaint, that the known part is diffused y.
    mu = 0.25
    model = gaussian_eps_model(mu, 0.0, AB)
    ts = timesteps(1000, 10)
    x_T = rand(64, 3, 8, 8, seed=10)
    noise = rand(64, *A.observation_shape((3, 8, 8)), seed=11)
    y = A.observe(torch.full((64, 3, 8, 8), mu, dtype=F64), noise)
    levels = list(AB[ts[1:]].tolist()) + [1.0]
    seen = []

    def record(i, t, x, x0):
        seen.append(float((x - math.sqrt(levels[i]) * mu).pow(2).mean()))

    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    out = restore(model, y, A, AB, ts, x_T, method=method, eta=eta, generator=gens, callback=record)
    for got, ab in zip(seen[:-1], levels[:-1], strict=True):
        assert got == pytest.approx(1 - ab, rel=0.05)
    torch.testing.assert_close(out, torch.full_like(out, mu), rtol=0, atol=1e-12)  # (DDNM+: lambda = 0 at the end)


def test_ddnm_plus_denoises_gaussian_data_near_the_posterior_mean():
    # N(0, 0.5^2) pixels seen through noise 0.5: the MMSE is 0.125; a posterior sample has error
    # 2 x 0.125 = 0.25; the observation itself 0.25. DDNM+ must beat the observation clearly.
    model = gaussian_eps_model(0.0, 0.5, AB)
    x = 0.5 * rand(32, 1, 16, 16, seed=12)
    A = Denoising(0.5)
    y = A.observe(x, rand(32, 1, 16, 16, seed=13))
    out = restore(model, y, A, AB, timesteps(1000, 50), rand(32, 1, 16, 16, seed=14), clip_x0=False)
    mse = float((out - x).pow(2).mean())
    assert 0.125 * 0.95 < mse < 0.2


def test_images_do_not_depend_on_the_batch():
    A = SuperResolution(2, sigma=0.1)
    model = gaussian_eps_model(0.0, 0.5, AB)
    x_T = rand(3, 1, 8, 8, seed=15)
    y = A.observe(rand(3, 1, 8, 8, seed=16), rand(3, 1, 4, 4, seed=17))
    kwargs = {"eta": 0.8, "jump": 3, "resample": 2}
    together = restore(
        model,
        y,
        A,
        AB,
        timesteps(1000, 10),
        x_T,
        generator=[torch.Generator().manual_seed(i) for i in range(3)],
        **kwargs,
    )
    alone = restore(
        model, y[1:2], A, AB, timesteps(1000, 10), x_T[1:2], generator=[torch.Generator().manual_seed(1)], **kwargs
    )
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-12)


def test_travel_schedule_is_repaints():
    # RePaint's get_schedule_jump(T=5, jump_length=2, jump_n_sample=2), shifted by one level.
    assert travel_schedule(5, 2, 2) == [5, 4, 3, 4, 5, 4, 3, 2, 1, 2, 3, 2, 1, 0]
    assert travel_schedule(3) == [3, 2, 1, 0]
    assert travel_schedule(5, 10, 4) == [5, 4, 3, 2, 1, 0]  # no room to jump
    assert model_calls(5, 2, 2) == 9
    assert model_calls(50, 10, 10) == 50 + 4 * 9 * 10
    for bad in ((0, 1, 1), (5, 0, 1), (5, 1, 0), (5, 1.5, 1)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            travel_schedule(*bad)


def test_mask_presets():
    assert mask_preset("bottom-half", 4, 4).tolist() == [[True] * 4] * 2 + [[False] * 4] * 2
    assert mask_preset("right-half", 2, 4).tolist() == [[True, True, False, False]] * 2
    center = mask_preset("center", 8, 8)
    assert (~center).sum() == 16 and not center[2:6, 2:6].any()
    random = mask_preset("random:0.25", 8, 8, torch.Generator().manual_seed(0))
    assert (~random).sum() == 16
    assert torch.equal(random, mask_preset("random:0.25", 8, 8, torch.Generator().manual_seed(0)))
    for bad in ("random:0", "random:1", "random:x", "diagonal"):
        with pytest.raises(ValueError, match="random:P|unknown mask"):
            mask_preset(bad, 8, 8)


def test_bad_input_is_a_value_error():
    model = gaussian_eps_model(0.0, 0.5, AB)
    ts = timesteps(1000, 5)
    x_T = rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="does not divide the resolution 16x16"):
        restore(model, rand(2, 1, 5, 5), SuperResolution(3), AB, ts, x_T)
    with pytest.raises(ValueError, match="3-channel"):
        restore(model, rand(2, 1, 16, 16), Colorization(), AB, ts, x_T)
    with pytest.raises(ValueError, match="the mask is 8x8; the images are 16x16"):
        restore(model, rand(2, 1, 16, 16), Inpainting(mask_preset("center", 8, 8)), AB, ts, x_T)
    with pytest.raises(ValueError, match=r"observations have shape \(2, 1, 16, 16\)"):
        restore(model, rand(2, 1, 16, 16), SuperResolution(2), AB, ts, x_T)
    with pytest.raises(ValueError, match="RePaint assumes a noiseless"):
        restore(model, rand(2, 1, 16, 16), Denoising(0.1), AB, ts, x_T, method="repaint")
    with pytest.raises(ValueError, match="unknown restoration method"):
        restore(model, rand(2, 1, 16, 16), Denoising(0.1), AB, ts, x_T, method="ilvr")
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        Denoising(-0.1)
    with pytest.raises(ValueError, match="mask must be the last"):
        Composed([Inpainting(mask_preset("center", 8, 8)), SuperResolution(2)])
