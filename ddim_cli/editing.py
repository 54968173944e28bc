"""Class-to-class editing of real images, as thin layers over the shared sampler and inversion.

* DDIB, Dual Diffusion Implicit Bridges (Su et al. 2022): encode the image to its latent by DDIM
  inversion under the *source* conditioning (a class, or the null label), then decode that latent
  by deterministic DDIM under the *target* class. The latent keeps what the classes share (for
  digits: position, stroke width, slant); exact inversion makes the encoding faithful.
* SDEdit (Meng et al. 2021): diffuse the image forward to ``t0 = strength * T`` with fresh noise,
  ``x_t0 = sqrt(ab) x_0 + sqrt(1 - ab) z``, and denoise from there under the target class. Small
  strengths stay close to the image and may keep its class; strength 1 is a fresh sample.

Each takes ``eps_model``-style callables (:mod:`ddim_cli.sampling`), so guidance, the prediction
target and null-text embeddings are the caller's choice.
"""

from __future__ import annotations

import math

import torch

from ddim_cli.inversion_defaults import EXACT_TOL
from ddim_cli.sampling import EpsModel, ExactInversionReport, Generator, invert, sample


def ddib(
    source_model: EpsModel,
    target_model: EpsModel,
    x_0: torch.Tensor,
    alpha_bars: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    prediction: str = "eps",
    exact: bool = True,
    max_iter: int = 10,
    tol: float = EXACT_TOL,
    report: list[ExactInversionReport] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edited, latent)``: ``x_0`` inverted under ``source_model``, decoded under ``target_model``
    (deterministic DDIM both ways, no clipping, so that equal models give back ``x_0``)."""
    latent = invert(
        source_model,
        x_0,
        alpha_bars,
        timesteps,
        prediction=prediction,
        exact=exact,
        max_iter=max_iter,
        tol=tol,
        report=report,
    )
    return sample(target_model, latent, alpha_bars, timesteps, prediction=prediction), latent


def sdedit_timesteps(timesteps: torch.Tensor, num_timesteps: int, strength: float) -> torch.Tensor:
    """The timesteps SDEdit denoises through: ``t0 = ceil(strength * T) - 1``, then every one of
    ``timesteps`` below it."""
    strength = float(strength)
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength:g}")
    start = max(0, math.ceil(strength * num_timesteps) - 1)
    below = timesteps[timesteps < start]
    return torch.cat([torch.tensor([start], dtype=timesteps.dtype), below.cpu()])


def sdedit(
    target_model: EpsModel,
    x_0: torch.Tensor,
    noise: torch.Tensor,
    alpha_bars: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    strength: float,
    prediction: str = "eps",
    eta: float = 0.0,
    clip_x0: bool = True,
    generator: Generator = None,
) -> torch.Tensor:
    """``x_0`` diffused with ``noise`` (N(0, I), shaped like ``x_0``) to ``t0 = strength * T`` and
    denoised by DDIM (``eta``) under ``target_model`` through the ``timesteps`` below ``t0``."""
    if noise.shape != x_0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, the images {tuple(x_0.shape)}")
    steps = sdedit_timesteps(timesteps, len(alpha_bars), strength)
    ab = float(alpha_bars[steps[0]])
    x_t0 = math.sqrt(ab) * x_0 + math.sqrt(1 - ab) * noise.to(x_0)
    return sample(
        target_model,
        x_t0,
        alpha_bars,
        steps,
        eta=eta,
        clip_x0=clip_x0,
        prediction=prediction,
        generator=generator,
    )
