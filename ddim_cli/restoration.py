"""Zero-shot restoration with any trained model: DDNM and RePaint over the shared DDIM step.

A degradation is linear with Gaussian noise, ``y = A x + sigma n``. Every one here has equal
nonzero singular values ``s`` (``A A^T = s^2 I`` on the entries it observes), so its Moore-Penrose
pseudo-inverse is ``A^+ = A^T / s^2`` and ``P = A^+ A`` is the orthogonal projection onto the
part of ``x`` that ``y`` determines: the *range*; the rest is the *null space* (DDNM, Wang et al.
2022, Eq. 3-5). An ``x`` whose range part is ``A^+ y`` satisfies ``A x = y`` exactly.

* DDNM (their Algorithm 1, Eq. 13): at each step the model's ``x0_hat`` keeps its null-space part
  and takes the range part from the observation, ``x0_hat - A^+ (A x0_hat - y)``, the nearest
  ``x`` with ``A x = y``; then a DDIM step (:mod:`ddim_cli.sampling`, any ``eta``). The last step
  lands on an ``x_0`` with ``A x_0 = y``. Clipping to [-1, 1] is done inside that projection
  (:func:`consistent_in_range`), so that clipping does not undo the consistency.
* DDNM+ (their Section 3.3, Eq. 17-19), for ``sigma > 0``, in the DDIM form of the authors' code:
  ``A^+ y`` carries noise of std ``sigma / s`` per range direction, ``a sigma / s`` after the step's
  ``a = sqrt(alpha_bar_prev)``. In the range, that carried noise replaces the DDIM direction term
  ``b eps``: the correction is scaled by ``lambda = min(1, b s / (a sigma))`` so that the noise it
  carries is at most ``b``, and fresh noise tops the range up to the variance the step needs
  (``b^2 + sigma_t^2`` in all). The null space takes the plain DDIM step. (The authors' code tests
  ``sqrt(1 - alpha_bar_prev)`` instead of ``b`` against the carried noise; the two agree at
  ``eta = 0``, and ours keeps ``lambda`` continuous for ``eta > 0``.) Near the data, ``lambda``
  goes to 0 and the model's estimate wins over the noisy observation.
* RePaint (Lugmayr et al. 2022, Eq. 8-9): each step's range part comes from the observation diffused
  to the next level, ``sqrt(alpha_bar_prev) A^+ y + sqrt(1 - alpha_bar_prev) P z``, the null part
  from the DDIM step of ``x_t``. For a mask this is RePaint exactly; the projection extends it to
  any noiseless degradation here.
* Time travel (RePaint's resampling, Section 4.2; DDNM Section 3.4): after reaching certain levels
  the state goes back up ``jump`` levels by the forward process ``q(x_t' | x_t)`` and descends
  again, ``resample - 1`` extra times (:func:`travel_schedule`), harmonising the two parts.

``eps_model(x, t)`` and ``prediction`` are as for :func:`ddim_cli.sampling.sample`; randomness comes
only from the ``generator`` passed in (one per image keeps images independent of the batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F

from ddim_cli.parameterization import check_prediction, x0_and_eps
from ddim_cli.sampling import Callback, EpsModel, Generator, noise_like, plan, update

RESTORE_METHODS = ("ddnm", "repaint")
MASK_PRESETS = ("bottom-half", "top-half", "left-half", "right-half", "center")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L"): what a grayscale photo holds


class Degradation:
    """``y = A x + sigma n`` with ``n ~ N(0, I)``. A subclass gives ``A`` (:meth:`degrade`), its
    pseudo-inverse (:meth:`pinv`), the shape of ``y`` (:meth:`observation_shape`, which also checks
    that the degradation fits the images) and ``singular_value``, the ``s`` of ``A A^T = s^2 I``."""

    singular_value = 1.0

    def __init__(self, sigma: float = 0.0):
        sigma = float(sigma)
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"the noise level sigma must be a finite number >= 0, got {sigma:g}")
        self.sigma = sigma

    def degrade(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def observation_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        raise NotImplementedError

    def observed(self, y: torch.Tensor) -> torch.Tensor | None:
        """Which entries of ``y`` are observations (None: all); a mask's missing pixels are not."""
        return None

    def show(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` as an image the size of the model's, for grids."""
        return self.pinv(y)

    def observation_error(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per image, the RMS of ``A x - y`` over the observed values (a mask's missing ones aside)."""
        residual = self.degrade(x) - y
        observed = self.observed(residual)
        if observed is not None:
            residual = torch.where(observed, residual, torch.full_like(residual, float("nan")))
        return residual.flatten(1).pow(2).nanmean(1).sqrt()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``A^+ A x``: the part of ``x`` the observation determines."""
        return self.pinv(self.degrade(x))

    def observe(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``A x + sigma n``; ``noise`` (shaped like ``A x``) is needed when ``sigma > 0``."""
        y = self.degrade(x)
        if self.sigma:
            if noise is None or noise.shape != y.shape:
                raise ValueError(f"sigma > 0 needs noise shaped like the observation {tuple(y.shape)}")
            y = y + self.sigma * noise.to(y)
        return y


class Denoising(Degradation):
    """``A = I``: only the noise."""

    def degrade(self, x):
        return x

    def pinv(self, y):
        return y

    def observation_shape(self, image_shape):
        return tuple(image_shape)


class Inpainting(Degradation):
    """Keep the pixels where ``known`` (an (H, W) bool tensor) is True, zero the rest (all channels)."""

    def __init__(self, known: torch.Tensor, sigma: float = 0.0):
        super().__init__(sigma)
        if known.dim() != 2 or known.dtype != torch.bool:
            raise ValueError(f"the mask must be an (H, W) bool tensor, got {known.dtype} {tuple(known.shape)}")
        self.known = known

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        return self.known.to(device=like.device, dtype=like.dtype)

    def degrade(self, x):
        return x * self._weights(x)

    def pinv(self, y):
        return y * self._weights(y)

    def observed(self, y):
        return self.known.to(y.device).expand_as(y)

    def observation_shape(self, image_shape):
        if tuple(self.known.shape) != tuple(image_shape[1:]):
            h, w = self.known.shape
            raise ValueError(f"the mask is {w}x{h}; the images are {image_shape[2]}x{image_shape[1]}")
        return tuple(image_shape)


class SuperResolution(Degradation):
    """``A``: average pooling over ``factor x factor`` blocks; ``A^+``: each value repeated over its
    block (rows of ``A`` are orthogonal, norm ``1 / factor``)."""

    def __init__(self, factor: int, sigma: float = 0.0):
        super().__init__(sigma)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"the super-resolution factor must be an integer >= 1, got {factor!r}")
        self.factor = factor
        self.singular_value = 1.0 / factor

    def degrade(self, x):
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y):
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    def observation_shape(self, image_shape):
        c, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"the factor {self.factor} does not divide the resolution {w}x{h}")
        return (c, h // self.factor, w // self.factor)


class Colorization(Degradation):
    """``A``: the weighted sum of the channels (default: luma, as PIL's grayscale); ``A^+ y = w y / |w|^2``."""

    def __init__(self, weights: Sequence[float] = LUMA, sigma: float = 0.0):
        super().__init__(sigma)
        self.weights = torch.tensor(weights, dtype=torch.float64)
        if self.weights.dim() != 1 or float(self.weights.norm()) == 0:
            raise ValueError("colorization needs a non-zero weight per channel")
        self.singular_value = float(self.weights.norm())

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        return self.weights.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)

    def degrade(self, x):
        return (x * self._weights(x)).sum(1, keepdim=True)

    def pinv(self, y):
        return y * self._weights(y) / self.singular_value**2

    def show(self, y):
        return y.expand(-1, len(self.weights), -1, -1)

    def observation_shape(self, image_shape):
        c, h, w = image_shape
        if c != len(self.weights):
            raise ValueError(f"colorization needs a {len(self.weights)}-channel (RGB) model; this one has {c}")
        return (1, h, w)


class Composed(Degradation):
    """``parts`` applied in order (each noiseless), then the noise. ``A A^T = s^2 I`` holds for the
    product when it holds for each part; a mask (zero singular values) may only come last."""

    def __init__(self, parts: Sequence[Degradation], sigma: float = 0.0):
        super().__init__(sigma)
        if not parts or any(part.sigma for part in parts):
            raise ValueError("compose one or more noiseless degradations; give the noise to the composition")
        if any(isinstance(part, Inpainting) for part in parts[:-1]):
            raise ValueError("a mask must be the last part of a composed degradation")
        self.parts = tuple(parts)
        self.singular_value = math.prod(part.singular_value for part in parts)

    def degrade(self, x):
        for part in self.parts:
            x = part.degrade(x)
        return x

    def pinv(self, y):
        for part in reversed(self.parts):
            y = part.pinv(y)
        return y

    def show(self, y):
        for part in reversed(self.parts):
            y = part.show(y)
        return y

    def observed(self, y):
        return self.parts[-1].observed(y)

    def observation_shape(self, image_shape):
        for part in self.parts:
            image_shape = part.observation_shape(image_shape)
        return image_shape


def mask_preset(name: str, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The known pixels (True) of a preset: ``bottom-half`` (etc.) is *missing* that half, ``center``
    the central square of half the size, ``random:P`` a fraction ``P`` of the pixels, chosen exactly
    (``round(P H W)`` of them) with ``generator``."""
    known = torch.ones(height, width, dtype=torch.bool)
    if name.startswith("random:"):
        try:
            fraction = float(name.removeprefix("random:"))
        except ValueError:
            fraction = math.nan
        if not 0 < fraction < 1:
            raise ValueError(f"random:P needs a fraction of missing pixels 0 < P < 1, got {name!r}")
        missing = torch.randperm(height * width, generator=generator)[: round(fraction * height * width)]
        known.view(-1)[missing] = False
        return known
    regions = {
        "bottom-half": (slice(height // 2, None), slice(None)),
        "top-half": (slice(None, height // 2), slice(None)),
        "left-half": (slice(None), slice(None, width // 2)),
        "right-half": (slice(None), slice(width // 2, None)),
        "center": (slice(height // 4, height // 4 + height // 2), slice(width // 4, width // 4 + width // 2)),
    }
    if name not in regions:
        raise ValueError(f"unknown mask {name!r}; choose one of {', '.join(MASK_PRESETS)}, random:P or a PNG file")
    known[regions[name]] = False
    return known


def travel_schedule(num_steps: int, jump: int = 1, resample: int = 1) -> list[int]:
    """The levels visited, from ``num_steps`` (the first sampling timestep) down to 0 (the data),
    one level at a time. Level ``k`` is the ``k``-th sampling timestep counted from the data end.

    After arriving at levels ``1, 1 + jump, 1 + 2 jump, ...`` (those with ``jump`` levels above
    them) the walk goes back up ``jump`` levels and down again, ``resample - 1`` times: RePaint's
    ``get_schedule_jump`` (``jump_length``, ``jump_n_sample``). ``resample = 1`` is plain sampling.
    """
    for name, value in (("num_steps", num_steps), ("jump", jump), ("resample", resample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    remaining = {level: resample - 1 for level in range(1, num_steps - jump + 1, jump)}
    levels, level = [num_steps], num_steps
    while level > 0:
        level -= 1
        levels.append(level)
        if remaining.get(level, 0) > 0:
            remaining[level] -= 1
            for _ in range(jump):
                level += 1
                levels.append(level)
    return levels


def model_calls(num_steps: int, jump: int = 1, resample: int = 1) -> int:
    """How many times :func:`restore` evaluates the model per image."""
    return sum(1 for level, next_level in pairwise(travel_schedule(num_steps, jump, resample)) if next_level < level)


@torch.no_grad()
def restore(
    eps_model: EpsModel,
    y: torch.Tensor,
    degradation: Degradation,
    alpha_bars: torch.Tensor,
    timesteps: torch.Tensor,
    x_T: torch.Tensor,
    *,
    method: str = "ddnm",
    eta: float = 0.0,
    jump: int = 1,
    resample: int = 1,
    clip_x0: bool = True,
    prediction: str = "eps",
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Images ``x_0`` consistent with the observations ``y`` (one per image of ``x_T``), sampled from
    ``x_T`` at ``timesteps[0]`` through the strictly decreasing ``timesteps`` by DDIM with ``eta``.

    ``method``: ``ddnm`` (DDNM, or DDNM+ when ``degradation.sigma > 0``) or ``repaint`` (noiseless
    degradations only). ``jump`` and ``resample``: time travel (:func:`travel_schedule`).
    ``clip_x0`` keeps ``x0_hat`` in [-1, 1]: noiseless DDNM then takes the nearest image in [-1, 1]
    consistent with ``y`` (:func:`consistent_in_range`), so that its result both satisfies ``A x_0 =
    y`` and lies in [-1, 1]; DDNM+ and RePaint clamp the model's estimate. ``callback(i, t, x,
    x0_hat)`` follows every model call (see :func:`model_calls`).
    """
    check_prediction(prediction)
    if method not in RESTORE_METHODS:
        raise ValueError(f"unknown restoration method {method!r}; choose one of {', '.join(RESTORE_METHODS)}")
    if method == "repaint" and degradation.sigma:
        raise ValueError("RePaint assumes a noiseless observation; use the ddnm method for sigma > 0")
    if not torch.is_floating_point(x_T) or x_T.dim() != 4:
        raise ValueError(f"x_T must be a float (N, C, H, W) tensor, got {x_T.dtype} {tuple(x_T.shape)}")
    expected = (x_T.shape[0], *degradation.observation_shape(tuple(x_T.shape[1:])))
    if tuple(y.shape) != expected:
        raise ValueError(f"the observations have shape {tuple(y.shape)}; these images need {expected}")
    steps = plan(alpha_bars, timesteps, method="ddim", eta=eta)
    if prediction == "eps" and steps[0].alpha_bar == 0:
        raise ValueError("the first timestep has alpha_bar = 0, where an eps-prediction model cannot recover x0")
    levels = travel_schedule(len(steps), jump, resample)
    alpha_bar_at = [1.0] + [step.alpha_bar for step in reversed(steps)]  # level k -> alpha_bar
    y = y.to(x_T)
    y_range = degradation.pinv(y) if method == "repaint" else None
    smallest_gain = _smallest_gain(degradation, y) if method == "ddnm" and clip_x0 else None
    x, calls = x_T, 0
    for level, next_level in pairwise(levels):
        if next_level > level:  # time travel: the forward process q(x_next_level | x_level)
            kept = alpha_bar_at[next_level] / alpha_bar_at[level]
            x = math.sqrt(kept) * x + math.sqrt(1.0 - kept) * noise_like(x, generator)
            continue
        step = steps[len(steps) - level]
        output = eps_model(x, torch.full((x.shape[0],), step.model_t, dtype=torch.long, device=x.device))
        if output.shape != x.shape:
            raise ValueError(f"eps_model returned shape {tuple(output.shape)} for input shape {tuple(x.shape)}")
        x0_hat, eps = x0_and_eps(output, x, step.alpha_bar, prediction)
        if method == "ddnm" and not degradation.sigma:  # DDNM, Eq. 13: the range part from y
            x0_hat = (
                consistent_in_range(x0_hat, y, degradation, smallest_gain)
                if clip_x0
                else _consistent(x0_hat, y, degradation)
            )
            x = update(step, x0_hat, eps, generator=generator)  # DDIM, Eq. 12
        else:
            if clip_x0:
                x0_hat = x0_hat.clamp(-1.0, 1.0)
            if method == "ddnm":
                x = _ddnm_plus_step(x0_hat, eps, y, degradation, step, generator)
            else:
                x = _repaint_step(x0_hat, eps, y_range, degradation, step, generator)
        if callback is not None:
            callback(calls, step.model_t, x, x0_hat)
        calls += 1
    return x


def _consistent(x0_hat: torch.Tensor, y: torch.Tensor, degradation: Degradation) -> torch.Tensor:
    """``x0_hat - A^+ (A x0_hat - y)``: the nearest ``x`` to ``x0_hat`` with ``A x = y`` (Eq. 13)."""
    return x0_hat - degradation.pinv(degradation.degrade(x0_hat) - y)


_BISECTIONS = 60  # halvings of each multiplier's bracket: far below float64 rounding of [-1, 1]


def consistent_in_range(
    x: torch.Tensor, y: torch.Tensor, degradation: Degradation, smallest_gain: float | None = None
) -> torch.Tensor:
    """The nearest image to ``x`` in [-1, 1] with ``A x = y`` (Euclidean), for ``y`` that some image
    in [-1, 1] explains (noiseless observations of such images).

    DDNM's clipped ``x0_hat`` corrected by Eq. 13 may leave [-1, 1] (a block averaging -1 with a
    brighter pixel in it), and clamping it afterwards breaks ``A x = y``. Here the box is part of
    the projection. Its optimality conditions give ``x = clamp(x + A^T nu)``; every value of ``y``
    depends on its own pixels (pooling blocks, a pixel's channels, a known pixel), so each
    multiplier ``nu_j`` is found on its own, by bisection: ``(A clamp(x + A^T nu))_j`` grows with
    ``nu_j``. (``A^T nu`` is written ``A^+ nu`` here, the same up to the scale ``s^2``.)
    ``smallest_gain``: :func:`_smallest_gain` of the degradation, when the caller has it already.
    """
    if smallest_gain is None:
        smallest_gain = _smallest_gain(degradation, y)
    # A multiplier this large moves every pixel it reaches to a bound from wherever it starts.
    reach = ((1.0 + x.abs().amax()) / smallest_gain).expand_as(y)
    low, high = -reach, reach
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        over = degradation.degrade((x + degradation.pinv(middle)).clamp(-1.0, 1.0)) > y
        low, high = torch.where(over, low, middle), torch.where(over, middle, high)
    return (x + degradation.pinv((low + high) / 2)).clamp(-1.0, 1.0)


def _smallest_gain(degradation: Degradation, y: torch.Tensor) -> float:
    """The smallest nonzero entry of ``A^+`` applied to ones: how little a multiplier moves a pixel."""
    gain = degradation.pinv(torch.ones_like(y))
    return float(gain[gain > 0].min())


def _ddnm_plus_step(x0_hat, eps, y, degradation: Degradation, step, generator) -> torch.Tensor:
    """One DDNM+ step (Eq. 17-19 in DDIM form; see the module notes)."""
    a, b, sigma = step.a, step.b, step.sigma
    carried = a * degradation.sigma / degradation.singular_value  # observation noise per range direction
    if b >= carried:
        scale, fresh = 1.0, math.sqrt(max(b * b + sigma * sigma - carried * carried, 0.0))
    else:
        scale, fresh = b / carried, sigma
    z = noise_like(x0_hat, generator)
    null_eps = eps - degradation.project(eps)
    correction = degradation.pinv(degradation.degrade(x0_hat) - y)
    # sigma * z - (sigma - fresh) * P z: fresh noise at `fresh` in the range, `sigma` in the null space.
    return a * (x0_hat - scale * correction) + b * null_eps + sigma * z + (fresh - sigma) * degradation.project(z)


def _repaint_step(x0_hat, eps, y_range, degradation: Degradation, step, generator) -> torch.Tensor:
    """RePaint's Eq. 8-9: the null part from the DDIM step, the range part from the observation
    diffused to the next level (``alpha_bar_prev = a^2``)."""
    a, b, sigma = step.a, step.b, step.sigma
    unknown = a * x0_hat + b * eps
    if sigma:
        unknown = unknown + sigma * noise_like(x0_hat, generator)
    known = a * y_range + math.sqrt(max(1.0 - a * a, 0.0)) * degradation.project(noise_like(x0_hat, generator))
    return known + unknown - degradation.project(unknown)
