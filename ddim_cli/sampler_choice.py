"""The sampler a job runs: a user's choices (None: not given) over the checkpoint's config.

``ddim sample``, ``invert``, ``edit`` and ``restore`` choose their sampler here, and so can a Python
user: ``choose_sampler(loaded, "dpm++2m", steps=10)``.
"""

from __future__ import annotations

from ddim_cli.models import LoadedModel, SamplerSpec

SAMPLERS = ("ddim", "ddpm", "dpm++2m")


def choose_sampler(
    loaded: LoadedModel,
    method: str = "ddim",
    steps: int | None = None,
    eta: float | None = None,
    skip: str | None = None,
    variance: str = "posterior",
    clip_x0: bool | None = None,
) -> SamplerSpec:
    """The :class:`SamplerSpec` for ``loaded``: what is not given comes from its config's
    ``sample`` section, except DDPM's steps (every training step) and DPM-Solver's spacing (log-SNR).
    A distilled student samples as it learned (:func:`student_sampler`). Checked against the schedule:
    a ValueError says what cannot work."""
    if loaded.config.distill is not None:
        return student_sampler(loaded, method, steps, eta, skip, clip_x0)
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(SAMPLERS)}")
    if method != "ddim" and eta:
        raise ValueError("--eta applies to --sampler ddim only")
    cfg = loaded.config.sample
    if method == "ddpm" and steps is None:
        steps = loaded.config.diffusion.num_timesteps  # DDPM's own setting: every training step
    if method == "dpm++2m" and skip is None:
        skip = "logsnr"  # DPM-Solver steps in log-SNR
    spec = SamplerSpec(
        method=method,
        steps=cfg.steps if steps is None else steps,
        eta=cfg.eta if method == "ddim" and eta is None else (eta or 0.0),
        skip=cfg.skip if skip is None else skip,
        variance=variance,
        clip_x0=cfg.clip_x0 if clip_x0 is None else clip_x0,
    )
    spec.check(loaded.alpha_bars)
    return spec


def student_sampler(
    loaded: LoadedModel, method: str, steps: int | None, eta: float | None, skip: str | None, clip_x0: bool | None
) -> SamplerSpec:
    """A student samples as it was distilled: its own sampler on the grid it learned, deterministic
    for progressive students (DDIM, eta 0); a choice that contradicts that is a ValueError."""
    distilled = loaded.config.distill
    own = distilled.sampler
    if method != "ddim":
        raise ValueError(f"a {distilled.method} student samples with its own sampler ({own}); drop --sampler")
    if eta and own == "ddim":
        raise ValueError("a progressive student learned deterministic DDIM steps; drop --eta")
    if eta:  # its chain draws fresh noise between steps by its own rule
        raise ValueError(f"a {distilled.method} student samples with the {own} chain, which takes no eta; drop --eta")
    if skip not in (None, distilled.spacing):
        raise ValueError(f"a distilled student samples on the {distilled.spacing} grid it learned; drop --skip")
    spec = SamplerSpec(
        own,
        distilled.steps if steps is None else steps,
        0.0,
        distilled.spacing,
        clip_x0=(loaded.config.sample.clip_x0 if clip_x0 is None else clip_x0),
    )
    spec.check(loaded.alpha_bars)
    return spec
