"""Classifier-free guidance (Ho & Salimans 2021): a conditional model turned into an ``eps_model``."""

from __future__ import annotations

from collections.abc import Callable

import torch

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(
    model: ConditionalModel, labels: torch.Tensor, scale: float, null_label: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps(x, t) = (1 + w) * model(x, t, y) - w * model(x, t, null)`` with ``w = scale``.

    This is the convention of Ho & Salimans (their Eq. 6) and of our seed notes: ``w = 0`` is the
    plain conditional model, larger ``w`` follows the class more closely. (diffusers' and Stable
    Diffusion's ``guidance_scale`` is ``1 + w``.) Both predictions come from one batched call.
    """
    scale = float(scale)
    if not scale >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    labels = labels.long()

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if labels.shape != (x.shape[0],):
            raise ValueError(f"got {tuple(labels.shape)} labels for a batch of {x.shape[0]}")
        y = labels.to(x.device)
        if scale == 0:
            return model(x, t, y)
        null = torch.full_like(y, null_label)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return (1 + scale) * cond - scale * uncond

    return eps_model
