"""Null-text inversion (Mokady et al. 2022): faithful DDIM inversion under classifier-free guidance.

Guided sampling, ``eps = (1 + w) eps(y) - w eps(null)``, does not retrace the path that the
unguided inversion climbed, so a guided reconstruction drifts from the image. Null-text inversion
keeps the model and the latent and instead tunes the null label's embedding, one vector per
sampling step:

1. *Pivot*: invert the image with the conditional model alone (guidance 0), keeping the points
   ``z*_t`` of every visited timestep (plain or exact inversion, :func:`ddim_cli.sampling.invert`).
2. From the noisiest point ``z_T = z*_T`` down, at each step optimise the null embedding ``e_t``
   (Adam, a few iterations, starting from the previous step's) so that the guided DDIM step from
   the current point lands on the pivot: minimise ``|DDIM(z_t, eps_w(z_t; e_t)) - z*_prev|^2``
   (their Eq. 3). Then take that step with the optimised ``e_t`` and go on.

Sampling the latent with the per-step embeddings (:func:`null_text_guidance`) repeats step 2's
trajectory exactly, so it reproduces the reconstruction. The conditional branch does not depend
on ``e_t``: it is evaluated once per step, without gradients.

``model(x, t, label_embedding)`` is the network conditioned on label embeddings ``(N, D)``; for
our U-Net, ``lambda x, t, e: unet(x, t, label_embedding=e)`` with ``unet.label_emb(y)`` for the
classes and ``unet.label_emb.weight[num_classes]`` for the null label.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddim_cli.inversion_defaults import EXACT_TOL, NULL_TEXT_INNER_STEPS
from ddim_cli.parameterization import check_prediction, x0_and_eps
from ddim_cli.sampling import ExactInversionReport, invert, plan, update

EmbeddedModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NullTextInversion:
    latent: torch.Tensor  # x_T at timesteps[0], (N, C, H, W)
    timesteps: torch.Tensor  # the sampling timesteps, decreasing, (S,)
    null_embeddings: torch.Tensor  # the null embedding to use at timesteps[i], (S, N, D)
    reconstruction: torch.Tensor  # where guided sampling with those embeddings ends, (N, C, H, W)
    step_losses: torch.Tensor  # each step's final per-dimension squared distance to the pivot, (S, N)


def null_text_inversion(
    model: EmbeddedModel,
    x_0: torch.Tensor,
    cond_embedding: torch.Tensor,
    null_embedding: torch.Tensor,
    alpha_bars: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    guidance: float,
    prediction: str = "eps",
    exact: bool = False,
    max_iter: int = 10,
    tol: float = EXACT_TOL,
    inner_steps: int = NULL_TEXT_INNER_STEPS,
    lr: float = 0.1,
    early_stop: float = 1e-5,
    report: list[ExactInversionReport] | None = None,
    progress: Callable[[int], None] | None = None,
) -> NullTextInversion:
    """Invert ``x_0`` under guidance ``w`` by optimising the null embedding per step (see above).

    ``cond_embedding`` (N, D): each image's class embedding; ``null_embedding`` (D,): where every
    image's optimisation starts. ``exact``, ``max_iter``, ``tol`` and ``report`` choose and
    describe the pivot's inversion. Per step, each image takes at most ``inner_steps`` Adam
    iterations at learning rate ``lr`` and stops as soon as its loss (mean squared distance to the
    pivot per dimension) is below ``early_stop``; images never affect each other's result.
    """
    check_prediction(prediction)
    guidance = float(guidance)
    if not 0 < guidance < math.inf:
        raise ValueError(f"null-text inversion needs a finite guidance w > 0, got {guidance}")
    if not (isinstance(inner_steps, int) and inner_steps >= 0):
        raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps!r}")
    if not 0 < lr < math.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    batch = x_0.shape[0]
    if cond_embedding.dim() != 2 or cond_embedding.shape[0] != batch:
        raise ValueError(f"cond_embedding must be (N, D) for N={batch} images, got {tuple(cond_embedding.shape)}")
    if null_embedding.shape != cond_embedding.shape[1:]:
        raise ValueError(f"null_embedding must be ({cond_embedding.shape[1]},), got {tuple(null_embedding.shape)}")
    cond_embedding = cond_embedding.detach()

    def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, cond_embedding)

    pivots = [x_0]  # z*_0 = x_0, then the point at each timestep from the last to the first
    latent = invert(
        conditional,
        x_0,
        alpha_bars,
        timesteps,
        prediction=prediction,
        exact=exact,
        max_iter=max_iter,
        tol=tol,
        report=report,
        callback=lambda i, t, x, x0: (pivots.append(x), progress and progress(1)),
    )
    z = latent
    embedding = null_embedding.detach().to(x_0).expand(batch, -1).clone()
    embeddings, losses = [], []
    for i, step in enumerate(plan(alpha_bars, timesteps)):
        target = pivots[-2 - i]
        t = torch.full((batch,), step.model_t, dtype=torch.long, device=z.device)
        with torch.no_grad():
            cond_output = model(z, t, cond_embedding)

        def guided_step(null: torch.Tensor, z=z, t=t, step=step, cond_output=cond_output) -> torch.Tensor:
            output = (1 + guidance) * cond_output - guidance * model(z, t, null)
            x0_hat, eps = x0_and_eps(output, z, step.alpha_bar, prediction)
            return update(step, x0_hat, eps)  # DDIM, eta = 0 (Eq. 12)

        embedding = _fit_null_embedding(guided_step, embedding, target, inner_steps, lr, early_stop)
        with torch.no_grad():
            z = guided_step(embedding)
        embeddings.append(embedding.clone())
        losses.append((z - target).double().flatten(1).pow(2).mean(1))
        if progress is not None:
            progress(1)
    return NullTextInversion(latent, timesteps.clone(), torch.stack(embeddings), z, torch.stack(losses))


def _fit_null_embedding(
    guided_step: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    target: torch.Tensor,
    inner_steps: int,
    lr: float,
    early_stop: float,
) -> torch.Tensor:
    """Adam on the per-image null embeddings; an image whose loss is below ``early_stop`` keeps its
    embedding from then on (its row is restored after each update, so the batch does not matter)."""
    embedding = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)
    active = torch.ones(len(start), dtype=torch.bool, device=start.device)
    for _ in range(inner_steps):
        with torch.enable_grad():
            per_image = (guided_step(embedding) - target).pow(2).flatten(1).mean(1)
            active &= per_image.detach() >= early_stop
            if not bool(active.any()):
                break
            # Gradients for the embedding alone: the network's weights get none (and keep none).
            (embedding.grad,) = torch.autograd.grad(per_image[active].sum(), [embedding])
        kept = embedding.detach().clone()
        optimizer.step()
        with torch.no_grad():
            embedding[~active] = kept[~active]
    return embedding.detach()


def null_text_guidance(
    model: EmbeddedModel,
    cond_embedding: torch.Tensor,
    null_embeddings: torch.Tensor,
    timesteps: torch.Tensor,
    guidance: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps_model(x, t) = (1 + w) model(x, t, cond) - w model(x, t, null_embeddings[i])`` where
    ``timesteps[i] = t``: the guided model that reproduces a :func:`null_text_inversion`."""
    index = {int(t): i for i, t in enumerate(timesteps.tolist())}
    if null_embeddings.dim() != 3 or len(null_embeddings) != len(index):
        raise ValueError(
            f"null_embeddings must be (S, N, D) with S={len(index)} timesteps, got {tuple(null_embeddings.shape)}"
        )

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = int(t[0])
        if step not in index or bool((t != step).any()):
            raise ValueError(f"no null embedding for timestep {t.tolist()}; these are for {sorted(index)}")
        null = null_embeddings[index[step]].to(x)
        if null.shape[0] != x.shape[0]:
            raise ValueError(f"the null embeddings are for {null.shape[0]} images, got a batch of {x.shape[0]}")
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond_embedding.to(x), null])).chunk(2)
        return (1 + guidance) * cond - guidance * uncond

    return eps_model
