"""Class labels and guidance for a job: a user's choices over the checkpoint's config.

What ``ddim sample`` and ``compare`` draw for each image (:func:`sample_conditioning`) and what
``invert`` and ``restore`` give the images they are handed (:func:`cycled_labels`).
"""

from __future__ import annotations

import torch

from ddim_cli.checkpoint import CheckpointError
from ddim_cli.models import LoadedModel, check_classes, class_labels
from ddim_cli.seeding import cycle_classes


def sample_conditioning(
    loaded: LoadedModel,
    generators: list[torch.Generator],
    classes: list[int] | None = None,
    unconditional: bool = False,
    guidance: float | None = None,
    first_index: int = 0,
) -> tuple[torch.Tensor | None, float]:
    """``(labels, w)``: per-image class labels (None: the null label) of images numbered from
    ``first_index``, as :func:`~ddim_cli.models.class_labels` draws them, and the guidance ``w``
    (None: the config's). A guidance that cannot apply is a one-line CheckpointError when asked for,
    and 0 when it is the config's."""
    distilled = loaded.config.distill
    if guidance and distilled is not None:
        raise CheckpointError(
            f"this student learned its teacher guided at w={distilled.guidance:g} and samples so in one call per "
            "step; --guidance does not apply"
        )
    labels = class_labels(loaded, generators, classes=classes, unconditional=unconditional, first_index=first_index)
    if labels is None:
        if guidance:
            why = "--unconditional samples with the null label" if unconditional else "this model is unconditional"
            raise CheckpointError(f"--guidance needs class labels; {why}")
        return None, 0.0
    return labels, loaded.config.sample.guidance if guidance is None else guidance


def cycled_labels(loaded: LoadedModel, classes: list[int] | None, guidance: float, count: int) -> torch.Tensor | None:
    """``classes`` cycled over ``count`` given images, or None (the null label, which cannot be guided)."""
    if classes is None:
        if guidance:
            raise CheckpointError("--guidance needs --class K (the null label cannot be guided)")
        return None
    check_classes(loaded, classes)
    return cycle_classes(classes, count)


def class_summary(labels: torch.Tensor) -> str:
    """``"0: 3, 7: 1"``: how many images of each class."""
    return ", ".join(f"{k}: {c}" for k, c in enumerate(labels.bincount().tolist()) if c)
