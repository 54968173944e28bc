"""DDPM and DDIM sampling, and deterministic DDIM inversion.

Every update here has the same shape. With ``x0_hat`` the data predicted from the noise estimate,

    x0_hat = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t)        (DDIM paper, Eq. 9)

one step is ``x_next = a * x0_hat + b * eps + c * x_t + sigma * z`` with ``z ~ N(0, I)``, and each
method is a table of ``(a, b, c, sigma)`` per step, computed once in float64:

* DDIM (Eq. 12): ``a = sqrt(alpha_bar_prev)``, ``b = sqrt(1 - alpha_bar_prev - sigma^2)``, ``c = 0``,
  with ``sigma = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t /
  alpha_bar_prev)`` (Eq. 16). ``eta = 0`` is deterministic, ``eta = 1`` is DDPM's posterior.
* DDPM ancestral sampling (Ho et al. 2020, Eq. 7) over the kept steps, with ``beta = 1 -
  alpha_bar_t / alpha_bar_prev``: the posterior mean ``a = sqrt(alpha_bar_prev) beta / (1 -
  alpha_bar_t)``, ``c = sqrt(1 - beta) (1 - alpha_bar_prev) / (1 - alpha_bar_t)``, ``b = 0``, and
  ``sigma^2`` either the posterior variance ``beta (1 - alpha_bar_prev) / (1 - alpha_bar_t)`` or
  ``beta`` itself (the DDIM paper's sigma-hat). No noise is added on the step into x_0.
* DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the same ODE as DDIM
  with eta = 0, in log-SNR time on the visited timesteps; it also uses the previous step's
  ``x0_hat`` (coefficient ``d``). Its first step and its step into x_0 are DDIM's.
* The multistep consistency chain (Song et al. 2023, "Consistency Models", Algorithm 1) of a
  consistency or DMD student, ``f(x, t) = c_skip(t) x + c_out(t) x0_hat`` then re-noised to the
  next level: ``a = sqrt(alpha_bar_prev) c_out``, ``c = sqrt(alpha_bar_prev) c_skip``, ``b = 0``,
  ``sigma = sqrt(1 - alpha_bar_prev)`` (0 into x_0, where it returns ``f``); diffusers'
  ``LCMScheduler`` steps the same chain.
* Inversion runs the deterministic DDIM update the other way, from ``alpha_bar`` = 1 (the data) up
  the same timesteps, taking ``eps`` at the current point and the *target* timestep (the explicit
  choice of diffusers' ``DDIMInverseScheduler`` and Null-text Inversion); it is exact as the steps
  shrink.

``eps_model(x, t)`` is any callable returning a tensor shaped like ``x``; ``t`` is a LongTensor of
*training* timesteps, shape ``(N,)``. Its output is the noise by default; ``prediction="x0"`` or
``"v"`` says it predicts the data or the velocity instead, and each step converts it to
``(x0_hat, eps)`` (:mod:`ddim_cli.parameterization`), so every method works with every target.
The schedule may end at ``alpha_bar = 0`` (zero terminal SNR) for the ``x0`` and ``v`` targets.
Randomness comes only from the ``generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from ddim_cli.inversion_defaults import EXACT_TOL
from ddim_cli.parameterization import check_prediction, consistency_scalings, x0_and_eps

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None

METHODS = ("ddim", "ddpm", "dpm++2m", "consistency")
VARIANCES = ("posterior", "beta")


@dataclass(frozen=True)
class _Step:
    """One update ``x_next = a * x0_hat + b * eps + c * x + d * x0_prev + sigma * z`` (float64
    coefficients; ``x0_prev`` is the previous step's x0_hat, used by multistep solvers)."""

    model_t: int  # training timestep the model is evaluated at
    alpha_bar: float  # alpha_bar of the current point x, to recover x0_hat
    a: float
    b: float
    c: float
    sigma: float
    d: float = 0.0
    model_alpha_bar: float | None = None  # alpha_bar of model_t where it differs from alpha_bar (inversion)


@torch.no_grad()
def sample(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alpha_bars: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    method: str = "ddim",
    eta: float = 0.0,
    variance: str = "posterior",
    clip_x0: bool = False,
    prediction: str = "eps",
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Denoise ``x_T`` (the noisy point at ``timesteps[0]``) down to ``x_0``.

    ``alpha_bars``: the model's training schedule, shape ``(T,)``. ``timesteps``: the training
    timesteps to visit, strictly decreasing (see :func:`ddim_cli.schedule.timesteps`).
    ``method="ddim"`` takes any ``eta >= 0`` for which Eq. 12 is defined; ``method="ddpm"`` takes
    ``variance="posterior"`` (beta-tilde) or ``"beta"``; ``method="dpm++2m"`` is deterministic;
    ``method="consistency"`` is a consistency or DMD student's chain (fresh noise between steps).
    ``clip_x0`` clamps ``x0_hat`` to [-1, 1] before it is used (the model's own eps is kept in
    the DDIM direction term, as in diffusers). ``prediction``: what ``eps_model`` returns, ``eps``,
    ``x0`` or ``v``; a schedule ending at ``alpha_bar = 0`` needs ``x0`` or ``v``.
    ``generator``: one ``torch.Generator`` for the batch, or one per image so that an image does
    not depend on the batch it is drawn in; noise is drawn on the generator's device. ``callback(i,
    t, x, x0_hat)`` is called after step ``i`` (at timestep ``t``) with the new state.
    """
    check_prediction(prediction)
    steps = plan(alpha_bars, timesteps, method=method, eta=eta, variance=variance)
    if prediction == "eps" and steps[0].alpha_bar == 0:
        raise ValueError(
            f"timestep {steps[0].model_t} has alpha_bar = 0 (zero terminal SNR), where an eps-prediction "
            "model cannot recover x0; use a v or x0 model, or timesteps that skip it"
        )
    return _run(eps_model, x_T, steps, clip_x0, prediction, generator, callback)


def plan(
    alpha_bars: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    method: str = "ddim",
    eta: float = 0.0,
    variance: str = "posterior",
) -> list[_Step]:
    """The per-step coefficients :func:`sample` uses; raises ValueError for invalid options."""
    ab_t, ab_prev = _step_alpha_bars(alpha_bars, timesteps)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "ddim" and eta != 0:
        raise ValueError(f"eta applies to method='ddim' only; method={method!r} got eta={eta}")
    if method == "ddim":
        coefficients = _ddim_coefficients(ab_t, ab_prev, eta)
    elif method == "ddpm":
        coefficients = _ddpm_coefficients(ab_t, ab_prev, variance)
    elif method == "dpm++2m":
        coefficients = _dpm2m_coefficients(ab_t, ab_prev)
    else:
        coefficients = _consistency_coefficients(timesteps, ab_prev)
    return [
        _Step(int(t), alpha_bar, *coef)
        for t, alpha_bar, coef in zip(timesteps.tolist(), ab_t.tolist(), coefficients, strict=True)
    ]


EXACT_ROUNDS = 4  # inversion passes at most: the first, then tightened ones for images that missed
EXACT_FIRST_STEP_TOL = 0.5  # the first pass's step tolerance, as a fraction of tol
_AIM = 0.5
_SMALLEST_SCALE = 1e-2  # ab_t floor: a zero-terminal-SNR step is left to the check
_ANDERSON_MEMORY = 2  # past iterations Anderson acceleration combines


@dataclass(frozen=True)
class ExactInversionReport:
    """How exact inversion went for one image (see :func:`invert`)."""

    reconstruction_rms: float  # RMS over the image of sample(latent) - x_0, as the best pass's check decoded it
    model_calls: int  # every call spent on the image: first guesses, fixed-point iterations, checking decodes
    rounds: int  # inversion passes: 1, and one more for each tightening after a failed check (the best is kept)
    converged: bool  # reconstruction_rms <= tol


@torch.no_grad()
def invert(
    eps_model: EpsModel,
    x_0: torch.Tensor,
    alpha_bars: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    clip_x0: bool = False,
    prediction: str = "eps",
    exact: bool = False,
    max_iter: int = 10,
    tol: float = EXACT_TOL,
    report: list[ExactInversionReport] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion: map data ``x_0`` to the latent at ``timesteps[0]``.

    ``timesteps`` is the same strictly decreasing sequence given to :func:`sample`, which with
    ``eta=0`` maps the result back to (approximately) ``x_0``. Whatever the ``prediction``, the
    model's output is turned into the noise estimate at the timestep it was evaluated at, so a
    perfect model inverts identically as an eps, x0 or v predictor.

    Plain inversion takes each step's noise at the point it starts from, an error of the order of
    the step. ``exact=True`` instead solves each step's implicit equation ``z_t = sqrt(ab_t) (x -
    sqrt(1 - ab_prev) eps(z_t)) / sqrt(ab_prev) + sqrt(1 - ab_t) eps(z_t)`` by Anderson-accelerated
    fixed-point iteration (AIDI, Pan et al. 2023; ReNoise, Garibi et al. 2024): the DDIM step from
    its solution lands on ``x`` exactly. The first step starts from the plain step; each later one
    from the step taken with the previous step's last noise estimate, which costs no call (the
    noise changes slowly along the trajectory). ``tol`` is the promise on the result: the RMS over
    each image of ``sample(latent) - x_0`` (on the data's scale, [-1, 1] for images). Each step
    iterates until its residual, scaled by ``1 / ab_t``, is at most the image's step tolerance, or
    ``max_iter`` iterations are spent: a DDIM decode with the noise held fixed carries an error of
    ``z_t`` into ``x_0`` as ``1 / sqrt(ab_t)``, and the model's noise estimate magnifies it further
    the noisier ``z_t`` is (on digits unlike the training data, 3 to 50 times more at ``ab_t`` below
    0.5; BENCHMARKS.md), for which the other ``1 / sqrt(ab_t)`` stands. Then the latents are
    decoded and checked: an image whose reconstruction misses ``tol`` (the model can magnify an
    error more than even that, on inputs unlike its training data) is solved again from its best
    trajectory with a tolerance tightened in proportion to the miss, up to ``EXACT_ROUNDS``
    passes; each image keeps its best pass (a step that iteration cannot contract can make a later
    pass worse). With a ``report`` list, one :class:`ExactInversionReport` per image is appended to
    it. ``callback`` sees the kept trajectory, after the last check.
    """
    check_prediction(prediction)
    ab_t, ab_prev = _step_alpha_bars(alpha_bars, timesteps)
    # Walk the sampling steps backwards: from alpha_bar_prev (1 for the data) up to alpha_bar_t.
    steps = [
        _Step(int(t), from_ab, math.sqrt(to_ab), math.sqrt(1.0 - to_ab), 0.0, 0.0, model_alpha_bar=to_ab)
        for t, to_ab, from_ab in zip(timesteps.tolist()[::-1], ab_t.tolist()[::-1], ab_prev.tolist()[::-1], strict=True)
    ]
    if not exact:
        return _run(eps_model, x_0, steps, clip_x0, prediction, None, callback)
    if clip_x0:
        raise ValueError("exact inversion solves the unclipped DDIM step; use clip_x0=False")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    _check_state(x_0)
    decode = plan(alpha_bars, timesteps)
    n, device = x_0.shape[0], x_0.device
    # The whole batch is evaluated on every call (a model may bind per-image labels to it); images
    # that are done ride along unchanged, so an image's result does not depend on its batch.
    trajectory: list[torch.Tensor] = []  # each step's solved point, of the best pass so far per image
    step_tol = torch.full((n,), EXACT_FIRST_STEP_TOL * tol, dtype=torch.float64, device=device)
    calls = torch.zeros(n, dtype=torch.long, device=device)
    error = torch.full((n,), math.inf, dtype=torch.float64, device=device)
    rounds = torch.zeros(n, dtype=torch.long, device=device)
    todo = torch.ones(n, dtype=torch.bool, device=device)
    for round_ in range(EXACT_ROUNDS):
        x, solved, eps = x_0, [], None
        for k, step in enumerate(steps):
            z_tol = step_tol * max(step.model_alpha_bar, _SMALLEST_SCALE)
            if round_:
                start = trajectory[k]
            else:  # the warm start; the first step has no noise estimate yet and takes the plain step
                start = None if eps is None else _inversion_step(step, x, eps)
            z, used, eps = _solve_step(eps_model, step, x, start, todo, z_tol, max_iter, prediction)
            calls += used
            solved.append(z)
            x = z
        # The check: decode exactly as sample() will, and measure the reconstruction.
        missed = _rms(_run(eps_model, x, decode, False, prediction, None, None) - x_0)
        calls += todo * len(decode)
        rounds += todo
        # A pass that made an image worse (a step that iteration cannot contract) is not kept.
        better = todo & (missed < error)
        keep = better.view(-1, *[1] * (x_0.dim() - 1))
        if trajectory:
            trajectory = [torch.where(keep, new, old) for new, old in zip(solved, trajectory, strict=True)]
        else:
            trajectory = solved
        error = torch.where(better, missed, error)
        todo &= error > tol
        if not bool(todo.any()):
            break
        # The reconstruction error scales about linearly with the step tolerance: aim below tol.
        step_tol = torch.where(todo, step_tol * (_AIM * tol / missed).clamp(0.02, 0.5), step_tol)
    if report is not None:
        report.extend(
            ExactInversionReport(e, c, r, e <= tol)
            for e, c, r in zip(error.tolist(), calls.tolist(), rounds.tolist(), strict=True)
        )
    if callback is not None:
        lower = x_0
        for k, (step, z) in enumerate(zip(steps, trajectory, strict=True)):
            # The x0_hat both ends share: lower = a_from x0 + s_from eps and z = a_to x0 + s_to eps.
            s_from = math.sqrt(1.0 - step.alpha_bar)
            x0_hat = (step.b * lower - s_from * z) / (step.b * math.sqrt(step.alpha_bar) - s_from * step.a)
            callback(k, step.model_t, z, x0_hat)
            lower = z
    return trajectory[-1]


def _solve_step(
    eps_model: EpsModel,
    step: _Step,
    x: torch.Tensor,
    start: torch.Tensor | None,
    todo: torch.Tensor,
    z_tol: torch.Tensor,
    max_iter: int,
    prediction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(z, calls, eps)``: the fixed point of one inversion step for the images in the ``todo``
    mask, from ``start`` (the plain step where None), iterated until the RMS change of each image's
    ``z`` is at most its ``z_tol`` or ``max_iter`` iterations are spent; ``calls`` per image; ``eps``
    the noise estimate of each image's own last call (None where no call was made). The other
    images keep ``start``."""
    t = torch.full((x.shape[0],), step.model_t, dtype=torch.long, device=x.device)

    def mapped(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = _model_eps(eps_model, z, t, step.model_alpha_bar, prediction)
        return _inversion_step(step, x, eps), eps

    calls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    last_eps = None
    if start is None:
        (z, last_eps), calls = mapped(x), calls + todo  # the plain step: the noise at the starting point
    else:
        z = start
    active = todo.clone()
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (z, F(z)) of the last iterations
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        image, eps = mapped(z)
        calls += active
        change = _rms(image - z)
        history = [*history[-_ANDERSON_MEMORY:], (z, image)]
        going = active & (change > z_tol)
        keep = active.view(-1, *[1] * (z.dim() - 1))
        # Images that are done ride along; what the call says of them must not reach their result.
        last_eps = eps if last_eps is None else torch.where(keep, eps, last_eps)
        # An image that has converged keeps F(z), one plain iteration past its last z.
        z = torch.where(keep, torch.where(going.view_as(keep), _anderson(history), image), z)
        active = going
    return z, calls, last_eps


def _inversion_step(step: _Step, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The DDIM step from ``x`` up to ``step``'s timestep with the noise estimate ``eps``."""
    x0_hat = (x - math.sqrt(1.0 - step.alpha_bar) * eps) / math.sqrt(step.alpha_bar)  # Eq. 9
    return step.a * x0_hat + step.b * eps


def _rms(difference: torch.Tensor) -> torch.Tensor:
    """Per-image root mean square, in float64."""
    return difference.double().flatten(1).pow(2).mean(1).sqrt()


def _anderson(history: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The next iterate of ``z = F(z)`` by Anderson acceleration (type II, as in AIDI), per image.

    With residuals ``f_k = F(z_k) - z_k``, it takes ``F(z_k) - dG gamma`` where ``gamma``
    minimises ``|f_k - dF gamma|`` over the differences ``dF``, ``dG`` of the last residuals and
    maps. Plain iteration converges linearly at the map's contraction factor (near 0.9 on the
    low-noise steps of a trained model); this removes the slow directions in a few calls.
    """
    z, mapped = history[-1]
    if len(history) == 1:
        return mapped
    flat = [(zi.double().flatten(1), gi.double().flatten(1)) for zi, gi in history]
    residuals = [g - zi for zi, g in flat]
    d_f = torch.stack([b - a for a, b in pairwise(residuals)], dim=2)  # (N, D, m)
    d_g = torch.stack([b[1] - a[1] for a, b in pairwise(flat)], dim=2)
    gram = d_f.transpose(1, 2) @ d_f
    # A relative ridge keeps the small solve well posed when differences become collinear.
    ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-300).view(-1, 1, 1)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    gamma = torch.linalg.solve(gram + ridge * eye, d_f.transpose(1, 2) @ residuals[-1].unsqueeze(2))
    return (flat[-1][1] - (d_g @ gamma).squeeze(2)).view_as(z).to(z.dtype)


def _model_eps(eps_model: EpsModel, x: torch.Tensor, t: torch.Tensor, alpha_bar: float, prediction: str):
    """The noise estimate from the model's output at ``x`` (signal level ``alpha_bar``)."""
    output = eps_model(x, t)
    if output.shape != x.shape:
        raise ValueError(f"eps_model returned shape {tuple(output.shape)} for input shape {tuple(x.shape)}")
    return x0_and_eps(output, x, alpha_bar, prediction)[1]


def _check_state(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x) or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor with a batch dimension, got {x.dtype} {tuple(x.shape)}")


def _run(
    eps_model: EpsModel,
    x: torch.Tensor,
    steps: list[_Step],
    clip_x0: bool,
    prediction: str,
    generator: Generator,
    callback: Callback | None,
) -> torch.Tensor:
    _check_state(x)
    batch = x.shape[0]
    model_t = torch.tensor([s.model_t for s in steps], dtype=torch.long, device=x.device)
    x0_prev = None
    for i, step in enumerate(steps):
        output = eps_model(x, model_t[i].expand(batch))
        if output.shape != x.shape:
            raise ValueError(f"eps_model returned shape {tuple(output.shape)} for input shape {tuple(x.shape)}")
        if step.model_alpha_bar is None:
            x0_hat, eps = x0_and_eps(output, x, step.alpha_bar, prediction)
        else:  # inversion: the noise the model sees at model_t, then x0_hat at the current point (Eq. 9)
            eps = x0_and_eps(output, x, step.model_alpha_bar, prediction)[1]
            x0_hat = (x - math.sqrt(1.0 - step.alpha_bar) * eps) / math.sqrt(step.alpha_bar)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        x, x0_prev = update(step, x0_hat, eps, x, x0_prev, generator), x0_hat
        if callback is not None:
            callback(i, step.model_t, x, x0_hat)
    return x


def update(
    step: _Step,
    x0_hat: torch.Tensor,
    eps: torch.Tensor,
    x: torch.Tensor | None = None,
    x0_prev: torch.Tensor | None = None,
    generator: Generator = None,
) -> torch.Tensor:
    """One step of any method from its model's ``(x0_hat, eps)``: ``a x0_hat + b eps + c x + d x0_prev
    + sigma z`` (DDIM's Eq. 12 where ``c = d = 0``); the one place a sampler's step is written."""
    x_next = step.a * x0_hat + step.b * eps
    if step.c:
        x_next = x_next + step.c * x
    if step.d:
        x_next = x_next + step.d * x0_prev
    if step.sigma:
        x_next = x_next + step.sigma * noise_like(x0_hat, generator)
    return x_next


def _step_alpha_bars(alpha_bars: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar at each visited timestep and at the one after it (1.0 after the last), float64."""
    if not isinstance(alpha_bars, torch.Tensor) or alpha_bars.dim() != 1 or len(alpha_bars) == 0:
        raise ValueError("alpha_bars must be a non-empty 1-D tensor")
    table = alpha_bars.detach().to("cpu", torch.float64)
    # The last entry may be 0: a zero-terminal-SNR schedule (Lin et al. 2023) ends in pure noise.
    in_range = bool((table[:-1] > 0).all()) and 0 <= float(table[-1]) and bool((table < 1).all())
    if not in_range or bool((table[1:] >= table[:-1]).any()):
        raise ValueError("alpha_bars must be strictly decreasing and lie in (0, 1) (the last may be 0)")
    if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1 or len(timesteps) == 0:
        raise ValueError("timesteps must be a non-empty 1-D tensor")
    if torch.is_floating_point(timesteps) or timesteps.dtype == torch.bool:
        raise ValueError(f"timesteps must be an integer tensor, got {timesteps.dtype}")
    steps = timesteps.detach().to("cpu", torch.long)
    T = len(table)
    if int(steps.min()) < 0 or int(steps.max()) >= T:
        raise ValueError(f"timesteps must lie in [0, {T - 1}] for a schedule of T={T}, got {steps.tolist()}")
    if len(steps) > 1 and not bool((steps[1:] < steps[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing, got {steps.tolist()}")
    ab_t = table[steps]
    ab_prev = torch.cat([table[steps[1:]], torch.ones(1, dtype=torch.float64)])
    return ab_t, ab_prev


def _ddim_coefficients(
    ab_t: torch.Tensor, ab_prev: torch.Tensor, eta: float
) -> list[tuple[float, float, float, float]]:
    eta = float(eta)
    if not 0 <= eta < math.inf:  # also rejects NaN
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    sigma_at_eta_1 = torch.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))  # Eq. 16
    sigma = eta * sigma_at_eta_1
    direction_var = 1 - ab_prev - sigma**2
    if bool((direction_var < -1e-12).any()):
        # Eq. 12 needs sigma^2 <= 1 - alpha_bar_prev; eta > 1 can break that on large jumps.
        positive = sigma_at_eta_1 > 0
        eta_max = torch.sqrt((1 - ab_prev[positive]) / sigma_at_eta_1[positive] ** 2).min()
        raise ValueError(
            f"eta={eta} is too large for these timesteps: the DDIM update needs eta <= {float(eta_max):.4f}"
        )
    direction = torch.sqrt(direction_var.clamp_min(0))
    return list(zip(torch.sqrt(ab_prev).tolist(), direction.tolist(), [0.0] * len(ab_t), sigma.tolist(), strict=True))


def _consistency_coefficients(timesteps: torch.Tensor, ab_prev: torch.Tensor) -> list[tuple[float, ...]]:
    """CM Algorithm 1 in the table's form: ``x_next = sqrt(ab_prev) f + sqrt(1 - ab_prev) z``."""
    c_skip, c_out = consistency_scalings(timesteps.detach().to("cpu", torch.long))
    level = torch.sqrt(ab_prev)
    return list(
        zip(
            (level * c_out).tolist(),
            [0.0] * len(ab_prev),
            (level * c_skip).tolist(),
            torch.sqrt(1 - ab_prev).tolist(),
            strict=True,
        )
    )


def _ddpm_coefficients(
    ab_t: torch.Tensor, ab_prev: torch.Tensor, variance: str
) -> list[tuple[float, float, float, float]]:
    beta = 1 - ab_t / ab_prev  # the respaced chain's beta between consecutive kept steps
    coef_x0 = torch.sqrt(ab_prev) * beta / (1 - ab_t)
    coef_xt = torch.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
    if variance == "posterior":
        var = beta * (1 - ab_prev) / (1 - ab_t)
    elif variance == "beta":
        var = beta.clone()
    else:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    var[-1] = 0.0  # the step into x_0 adds no noise
    return list(zip(coef_x0.tolist(), [0.0] * len(ab_t), coef_xt.tolist(), torch.sqrt(var).tolist(), strict=True))


def _dpm2m_coefficients(ab_t: torch.Tensor, ab_prev: torch.Tensor) -> list[tuple[float, ...]]:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on the discrete schedule, in log-SNR time.

    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma) and
    h_i = lambda_next - lambda_cur: x_next = (sigma_next / sigma_cur) x - alpha_next (e^-h - 1) D,
    where D = x0_hat on the first step and, after it, D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev with
    r = h_{i-1} / h_i. The step into x_0 (sigma = 0, h infinite) is first order: x_0 = x0_hat.
    """
    alpha, sigma = torch.sqrt(ab_t), torch.sqrt(1 - ab_t)
    alpha_next, sigma_next = torch.sqrt(ab_prev), torch.sqrt(1 - ab_prev)
    coefficients, h_prev = [], None
    for i in range(len(ab_t)):
        if i == len(ab_t) - 1:  # into x_0
            coefficients.append((1.0, 0.0, 0.0, 0.0, 0.0))
            break
        h = float(torch.log(alpha_next[i] / sigma_next[i]) - torch.log(alpha[i] / sigma[i]))
        weight = float(alpha_next[i] * -torch.expm1(torch.tensor(-h, dtype=torch.float64)))  # alpha (1 - e^-h)
        c = float(sigma_next[i] / sigma[i])
        if h_prev is None:
            coefficients.append((weight, 0.0, c, 0.0, 0.0))
        else:
            half_inverse_r = h / (2 * h_prev)  # 1 / (2r)
            coefficients.append((weight * (1 + half_inverse_r), 0.0, c, 0.0, -weight * half_inverse_r))
        h_prev = h
    return coefficients


def noise_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """N(0, I) shaped like ``x``, from one generator for the batch or one per image."""
    if generator is None or isinstance(generator, torch.Generator):
        device = x.device if generator is None else generator.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device) for g in generator]
    )
