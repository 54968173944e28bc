import math

import numpy as np
import pytest
import torch

from ddim_cli.schedule import SCHEDULE_KINDS, SPACINGS, alpha_bars, betas, timesteps


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_alpha_bars_are_float64_strictly_decreasing_in_unit_interval(kind, T):
    ab = alpha_bars(kind, T)
    assert ab.dtype == torch.float64 and ab.shape == (T,)
    assert bool(((ab > 0) & (ab < 1)).all())
    assert bool((ab[1:] < ab[:-1]).all())
    torch.testing.assert_close(ab, torch.cumprod(1 - betas(kind, T), 0), rtol=0, atol=0)


def test_linear_golden_values():
    b = betas("linear", 1000)
    assert b[0].item() == 1e-4 and b[-1].item() == 0.02
    # Independent product in plain Python floats.
    product = 1.0
    for i in range(1000):
        product *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999)
    assert alpha_bars("linear", 1000)[-1].item() == pytest.approx(product, rel=1e-12)
    assert alpha_bars("linear", 1000)[-1].item() == pytest.approx(4.0358297653756754e-05, rel=1e-12)
    assert alpha_bars("linear", 1000)[499].item() == pytest.approx(0.07858724288177824, rel=1e-12)


def test_quadratic_has_equally_spaced_sqrt_betas():
    b = betas("quadratic", 1000, beta_start=1e-4, beta_end=0.02)
    steps = torch.diff(torch.sqrt(b))
    torch.testing.assert_close(steps, torch.full_like(steps, (math.sqrt(0.02) - 0.01) / 999), rtol=1e-9, atol=0)
    assert alpha_bars("quadratic", 1000)[-1].item() == pytest.approx(0.0007334124595808148, rel=1e-12)


def test_sigmoid_betas_are_symmetric_about_the_midpoint():
    b = betas("sigmoid", 1000)
    torch.testing.assert_close(b + b.flip(0), torch.full_like(b, 1e-4 + 0.02), rtol=1e-12, atol=1e-15)
    assert b[0].item() == pytest.approx(1e-4 + 0.0199 / (1 + math.exp(6)), rel=1e-12)


def test_cosine_follows_the_closed_form_until_the_beta_cap():
    T, s = 1000, 0.008

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    ab = alpha_bars("cosine", T)
    expected = torch.tensor([f((t + 1) / T) / f(0) for t in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(ab[:-1], expected, rtol=1e-10, atol=0)
    assert betas("cosine", T)[-1].item() == 0.999  # f(1) = 0, so the last beta hits max_beta
    assert ab[0].item() == pytest.approx(0.999958715775178, rel=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda: betas("exponential", 10),
        lambda: betas("linear", 0),
        lambda: betas("linear", 10, beta_start=0.5, beta_end=0.1),
        lambda: betas("linear", 10, s=0.1),
        lambda: betas("cosine", 10, max_beta=1.5),
    ],
)
def test_bad_schedules_raise(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T", [1, 7, 17, 1000])
def test_every_spacing_gives_exactly_the_steps_asked_for(spacing, T):
    for S in sorted({1, 2, 3, T // 3, T // 2, T - 1, T} & set(range(1, T + 1))):
        ts = timesteps(T, S, spacing, alpha_bars("linear", T))
        assert ts.dtype == torch.long and ts.shape == (S,), (spacing, T, S)
        assert bool((ts[1:] < ts[:-1]).all()), (spacing, T, S, ts)
        assert 0 <= int(ts.min()) and int(ts.max()) <= T - 1


@pytest.mark.parametrize("S", [1, 2, 5, 10, 20, 50, 100, 250, 500, 999])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacings_for_the_paper_setting_are_distinct(S, spacing):
    ts = timesteps(1000, S, spacing, alpha_bars("cosine", 1000))
    assert len(set(ts.tolist())) == S


def test_golden_timesteps():
    assert timesteps(1000, 10, "uniform").tolist() == list(range(900, -1, -100))
    assert timesteps(1000, 3, "uniform").tolist() == [666, 333, 0]  # range(0, 1000, 333) cut to 3
    assert timesteps(1000, 10, "quad").tolist() == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    assert timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timesteps(1000, 3, "linspace").tolist() == [999, 500, 0]
    assert timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert timesteps(1000, 3, "trailing").tolist() == [999, 666, 332]
    assert timesteps(1000, 3, "lcm").tolist() == [999, 666, 333]  # rounded down where trailing rounds
    assert timesteps(1000, 16, "lcm")[:4].tolist() == [999, 937, 874, 812]  # trailing: 999, 937, 874, 811
    assert timesteps(1000, 8, "lcm").tolist() == timesteps(1000, 8, "trailing").tolist()


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 16, 25, 32])
def test_lcm_spacing_is_what_diffusers_lcm_scheduler_steps(steps):
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(num_train_timesteps=1000, original_inference_steps=1000)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == timesteps(1000, steps, "lcm").tolist()


@pytest.mark.parametrize("S", [10, 20, 25])
def test_uniform_and_quad_match_the_ddim_code_where_it_gives_distinct_steps(S):
    T = 1000
    uniform = list(range(0, T, T // S))
    quad = [int(v) for v in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]
    assert timesteps(T, S, "uniform").tolist() == uniform[::-1]
    assert len(set(quad)) == S
    assert timesteps(T, S, "quad").tolist() == quad[::-1]


def test_quad_moves_repeated_steps_up():
    # The DDIM code's quad spacing repeats 0 four times at S=100; ours keeps 100 distinct steps.
    ts = timesteps(1000, 100, "quad").flip(0).tolist()
    assert ts[:6] == [0, 1, 2, 3, 4, 5]
    assert ts[-1] == 800
    # With S close to T, pushing repeats up would pass T - 1; the tail is pulled back instead.
    assert timesteps(10, 10, "quad").tolist() == list(range(9, -1, -1))


def test_section_strings_follow_improved_diffusion():
    ts = sorted(timesteps(300, None, "10,15,20").tolist())
    assert len(ts) == 45
    assert ts[:10] == list(range(0, 100, 11))  # 100 steps strided to 10: stride 99/9 = 11
    # improved-diffusion accumulates the fractional stride, so 7 * (99 / 14) lands just below 49.5.
    assert ts[10:25] == [100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199]
    assert ts[25:] == [200 + round(i * 99 / 19) for i in range(20)]
    assert timesteps(300, 45, "10,15,20").shape == (45,)
    # Uneven split: 10 = 4 + 3 + 3; sections of one step take the first timestep of the section.
    assert sorted(timesteps(10, None, "1,1,1").tolist()) == [0, 4, 7]


def test_logsnr_spacing_is_even_in_log_snr():
    ab = alpha_bars("linear", 1000)
    ts = timesteps(1000, 10, "logsnr", ab)
    assert ts[0] == 999 and ts[-1] == 0
    log_snr = 0.5 * torch.log(ab[ts] / (1 - ab[ts]))
    gaps = torch.diff(log_snr)
    # Nearest integer timesteps: even gaps up to the rounding of t near 0, where lambda is steep.
    assert float(gaps[:-2].std() / gaps[:-2].mean()) < 0.05
    with pytest.raises(ValueError, match="needs the schedule's alpha_bars"):
        timesteps(1000, 10, "logsnr")


def test_ddim_section_strings_use_an_integer_stride():
    assert timesteps(1000, None, "ddim25").tolist() == list(range(960, -1, -40))
    assert timesteps(1000, None, "ddim3").tolist() == [668, 334, 0]


@pytest.mark.parametrize(
    ("T", "steps", "spacing", "message"),
    [
        (1000, 0, "uniform", "from 1 to 1000"),
        (1000, 1001, "quad", "from 1 to 1000"),
        (10, 11, "linspace", "got 11"),
        (1000, None, "uniform", "got None"),
        (15, None, "10,10", "section of 8 steps into 10"),
        (10, None, "ddim7", "exactly 7 of 10"),
        (10, None, "ddimx", "ddimN"),
        (10, None, "fast", "unknown spacing"),
        (10, None, "0,0", "at least one step"),
        (300, 40, "10,15,20", "gives 45 steps"),
    ],
)
def test_bad_timesteps_raise_naming_the_numbers(T, steps, spacing, message):
    with pytest.raises(ValueError, match=message):
        timesteps(T, steps, spacing)
