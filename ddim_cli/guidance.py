"""Classifier-free guidance (Ho & Salimans 2021): a conditional model turned into an ``eps_model``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(
    model: ConditionalModel, labels: torch.Tensor, scale: float, null_label: int, rescale: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps(x, t) = (1 + w) * model(x, t, y) - w * model(x, t, null)`` with ``w = scale``.

    This is the convention of Ho & Salimans (their Eq. 6) and of our seed notes: ``w = 0`` is the
    plain conditional model, larger ``w`` follows the class more closely. (diffusers' and Stable
    Diffusion's ``guidance_scale`` is ``1 + w``.) Both predictions come from one batched call.

    ``rescale`` is phi of Lin et al. 2023 (Sec. 3.4, diffusers' ``guidance_rescale``): the guided
    output ``g`` is scaled, per image, to the standard deviation of the conditional one ``c``, and
    mixed back, ``phi * g * std(c) / std(g) + (1 - phi) * g``. Guidance inflates the output's
    scale; followed over many sampling steps that overexposes the images (the digits quickstart's
    strokes grow brighter and thicker from 50 to 200 DDIM steps), which the rescale undoes.
    """
    scale, rescale = float(scale), float(rescale)
    if not 0 <= scale < math.inf:  # also rejects NaN
        raise ValueError(f"guidance scale must be a finite number >= 0, got {scale}")
    if not 0 <= rescale <= 1:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    labels = labels.long()

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if labels.shape != (x.shape[0],):
            raise ValueError(f"got {tuple(labels.shape)} labels for a batch of {x.shape[0]}")
        y = labels.to(x.device)
        if scale == 0:
            return model(x, t, y)
        null = torch.full_like(y, null_label)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        guided = (1 + scale) * cond - scale * uncond
        if not rescale:
            return guided
        per_image = tuple(range(1, guided.dim()))
        std_cond = cond.std(dim=per_image, correction=0, keepdim=True)  # the ratio is the same either way
        std_guided = guided.std(dim=per_image, correction=0, keepdim=True)
        # A constant guided output has no scale to match: it is left as it is.
        factor = torch.where(std_guided > 0, std_cond / std_guided.clamp_min(torch.finfo(guided.dtype).tiny), 1.0)
        return rescale * guided * factor + (1 - rescale) * guided

    return eps_model
