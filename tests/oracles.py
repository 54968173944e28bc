"""Exact noise predictions for data whose every coordinate is N(mu, s^2), independently.

With ``x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps``, ``x_t`` and ``eps`` are jointly Gaussian:
``Cov(eps, x_t) = sqrt(1 - ab)`` and ``Var(x_t) = ab s^2 + 1 - ab``, so the optimal (MMSE) noise
prediction is ``E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)``. ``s = 0``
is a point mass at ``mu``.

The same data's MMSE predictions of the other targets follow from the same joint Gaussian:
``E[x_0 | x_t] = mu + sqrt(ab) s^2 (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)`` and
``E[v | x_t] = sqrt(ab) E[eps | x_t] - sqrt(1 - ab) E[x_0 | x_t]``; all three stay finite at
``ab = 0`` (zero terminal SNR), where ``E[x_0 | x_t] = mu`` and ``E[eps | x_t] = x_t``.

The DDIM ODE (eta = 0) for this data has a closed-form solution: with ``xbar = x / sqrt(ab)`` and
``sigma^2 = (1 - ab) / ab`` it reads ``d xbar / d sigma = sigma (xbar - mu) / (s^2 + sigma^2)``,
so ``xbar - mu`` scales as ``sqrt(s^2 + sigma^2)``.
"""

from __future__ import annotations

import math

import torch


def gaussian_eps_model(mu: float, s: float, alpha_bars: torch.Tensor):
    table = alpha_bars.to(torch.float64)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        ab = table.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return torch.sqrt(1 - ab) * (x - torch.sqrt(ab) * mu) / (ab * s**2 + 1 - ab)

    return eps_model


def gaussian_model(mu: float, s: float, alpha_bars: torch.Tensor, prediction: str = "eps"):
    """The exact MMSE prediction of ``prediction`` (eps, x0 or v) for N(mu, s^2) data."""
    table = alpha_bars.to(torch.float64)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        ab = table.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        a, sd = torch.sqrt(ab), torch.sqrt(1 - ab)
        centred = (x - a * mu) / (ab * s**2 + 1 - ab)
        eps, x0 = sd * centred, mu + a * s**2 * centred
        return {"eps": eps, "x0": x0, "v": a * eps - sd * x0}[prediction]

    return model


def ode_solution(x_t: torch.Tensor, alpha_bar_t: float, mu: float, s: float) -> torch.Tensor:
    """The exact end point at alpha_bar = 1 of the DDIM ODE started from x_t at alpha_bar_t."""
    sigma2 = (1 - alpha_bar_t) / alpha_bar_t
    return mu + (x_t / math.sqrt(alpha_bar_t) - mu) * s / math.sqrt(s**2 + sigma2)


def mixture_eps_model(means: tuple[float, ...], s: float, alpha_bars: torch.Tensor):
    """The exact noise prediction when every coordinate is an equal mixture of N(m, s^2), m in
    ``means``: nonlinear in ``x_t``, unlike a single Gaussian. Given component k, ``x_t`` is
    N(sqrt(ab) m_k, v) with ``v = ab s^2 + 1 - ab``; so ``E[eps | x_t] = sum_k w_k sqrt(1 - ab)
    (x_t - sqrt(ab) m_k) / v`` with posterior weights ``w_k`` proportional to ``exp(-(x_t -
    sqrt(ab) m_k)^2 / (2 v))``."""
    table = alpha_bars.to(torch.float64)
    centres = torch.tensor(means, dtype=torch.float64)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = table.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)), 1)
        var = ab * s**2 + 1 - ab
        offsets = x.unsqueeze(-1) - torch.sqrt(ab) * centres.to(x)
        weights = torch.softmax(-offsets.pow(2) / (2 * var), dim=-1)
        return (weights * torch.sqrt(1 - ab) * offsets / var).sum(-1)

    return eps_model
