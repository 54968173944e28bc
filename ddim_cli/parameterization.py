"""What the network predicts: the noise ``eps``, the data ``x0`` or the velocity ``v``.

With ``x_t = a x_0 + s eps``, ``a = sqrt(alpha_bar_t)``, ``s = sqrt(1 - alpha_bar_t)``:

* ``eps``: the DDPM target (Ho et al. 2020); ``x0 = (x_t - s eps) / a`` (DDIM paper, Eq. 9).
* ``x0``: the data itself; ``eps = (x_t - a x0) / s``.
* ``v = a eps - s x0`` (Salimans & Ho 2022, Section 4); since ``a^2 + s^2 = 1``,
  ``x0 = a x_t - s v`` and ``eps = s x_t + a v``. It stays defined at ``alpha_bar = 0`` (zero
  terminal SNR), where ``x0 = -v`` and ``eps = x_t``; eps prediction does not.

Each conversion is affine in the model's output with weights that sum to one over a guided
combination, so classifier-free guidance may be applied to any of the three outputs alike.

Min-SNR-gamma (Hang et al. 2023) weights the per-example MSE of each target so that every target
amounts to the same loss on ``x0``, clamped at ``SNR = gamma``: with ``SNR = a^2 / s^2``,
``min(SNR, gamma) / SNR`` for eps, ``min(SNR, gamma)`` for x0 and ``min(SNR, gamma) / (SNR + 1)``
for v (their Eq. 8 and Section 3.4).

A consistency or DMD student is read through ``f(x, t) = c_skip(t) x + c_out(t) x0`` (Song et al.
2023, Eq. 5), whose scalings :func:`consistency_scalings` gives; its sampler is a method of
:func:`ddim_cli.sampling.sample`.
"""

from __future__ import annotations

import math

import torch

PREDICTIONS = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def x0_and_eps(output: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction: str) -> tuple:
    """``(x0_hat, eps_hat)`` from the model's ``output`` at the point ``x`` whose signal level is
    ``alpha_bar`` (a float; 0 is allowed for ``x0`` and ``v``, 1 for ``eps`` and ``v``)."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction == "eps":
        if a == 0:
            raise ValueError("eps prediction cannot recover x0 at alpha_bar = 0 (zero terminal SNR); use v or x0")
        return (x - s * output) / a, output
    if prediction == "x0":
        if s == 0:
            raise ValueError("x0 prediction cannot recover eps at alpha_bar = 1")
        return output, (x - a * output) / s
    if prediction == "v":
        return a * x - s * output, s * x + a * output
    check_prediction(prediction)
    raise AssertionError("unreachable")


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the network should output for ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise``;
    ``alpha_bar`` broadcasts against ``x0`` (one value per example)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    check_prediction(prediction)
    raise AssertionError("unreachable")


def loss_weights(alpha_bar: torch.Tensor, prediction: str, weighting: str = "none", gamma: float = 5.0) -> torch.Tensor:
    """Per-example weights of the MSE on ``prediction``'s target (``alpha_bar``: one per example)."""
    check_prediction(prediction)
    if weighting == "none":
        return torch.ones_like(alpha_bar)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    snr = alpha_bar / (1 - alpha_bar)
    clamped = snr.clamp(max=gamma)
    if prediction == "eps":
        # min(SNR, gamma) / SNR written as min(1, gamma / SNR): 1 at SNR = 0, not 0 / 0.
        return (gamma / snr).clamp(max=1.0)
    if prediction == "x0":
        return clamped
    return clamped / (snr + 1)


# --- the boundary scalings of a consistency function (:mod:`ddim_cli.distillation.consistency`) -----
SIGMA_DATA = 0.5  # the data's standard deviation assumed by c_skip / c_out (CM, Appendix C)
# Delta of c_skip / c_out per timestep (LCM's timestep_scaling): the boundary is a single timestep
# wide, so away from t_min f is the network's own data prediction and a student initialised from
# its teacher starts out as the teacher's x_hat. (CM's Delta = sigma_VE(t) - sigma_VE(t_min) gives
# c_skip 0.59 at sigma_VE 0.42, mixing that much of the noisy z into f: the network then has to
# learn to cancel it, and multistep samples, which visit those times, came out worse than 1-step.)
BOUNDARY_SCALE = 10.0


def consistency_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` at timesteps ``t`` (float64): exactly (1, 0) at t_min = 0, and
    ``c_skip < 0.003``, ``c_out > 0.998`` from timestep 1 on (CM, Appendix C, with LCM's
    ``Delta = 10 t`` in timesteps instead of a noise-level difference)."""
    delta = BOUNDARY_SCALE * t.double()
    c_skip = SIGMA_DATA**2 / (delta**2 + SIGMA_DATA**2)
    c_out = delta / (delta**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out
