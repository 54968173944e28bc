"""Noise schedules and the timestep subsequences samplers walk along.

Conventions (those of the DDIM paper's code, ermongroup/ddim):

* Training timesteps are ``t = 0 .. T-1``; ``alpha_bar[t] = prod_{s <= t} (1 - beta_s)`` is the
  signal fraction of ``x_t = sqrt(alpha_bar[t]) x_0 + sqrt(1 - alpha_bar[t]) eps``.
* Clean data sits "before" ``t = 0`` at ``alpha_bar = 1``: the last sampling step goes there.
* Every table is float64; cast to the working dtype only where it is used.
"""

from __future__ import annotations

import math

import torch

SCHEDULE_KINDS = ("linear", "cosine", "quadratic", "sigmoid")
SPACINGS = ("uniform", "quad", "linspace", "trailing", "lcm", "logsnr")

_SCHEDULE_DEFAULTS = {
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "quadratic": {"beta_start": 1e-4, "beta_end": 0.02},
    "sigmoid": {"beta_start": 1e-4, "beta_end": 0.02},
    "cosine": {"s": 0.008, "max_beta": 0.999},
}


def betas(kind: str, num_timesteps: int, **params: float) -> torch.Tensor:
    """The per-step noise variances ``beta_t`` (float64, shape ``(T,)``).

    ``linear``: DDPM's ``linspace(beta_start, beta_end, T)`` (1e-4 .. 0.02 by default; not rescaled
    with T). ``quadratic``: the DDIM code's ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``.
    ``sigmoid``: the DDIM code's ``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) +
    beta_start``. ``cosine``: Nichol & Dhariwal (2021), Eq. 17, ``alpha_bar(u) = cos((u + s) /
    (1 + s) * pi / 2) ** 2`` discretised as ``beta_t = min(1 - alpha_bar((t+1)/T) /
    alpha_bar(t/T), max_beta)``.
    """
    if kind not in _SCHEDULE_DEFAULTS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    unknown = set(params) - set(_SCHEDULE_DEFAULTS[kind])
    if unknown:
        raise ValueError(
            f"schedule {kind!r} takes {', '.join(sorted(_SCHEDULE_DEFAULTS[kind]))}; "
            f"got unknown {', '.join(sorted(unknown))}"
        )
    p = {**_SCHEDULE_DEFAULTS[kind], **params}
    T = num_timesteps
    f64 = torch.float64

    if kind == "cosine":
        if not 0 < p["max_beta"] < 1 or p["s"] < 0:
            raise ValueError(f"cosine schedule needs 0 < max_beta < 1 and s >= 0, got {p}")

        def alpha_bar_fn(u: float) -> float:
            return math.cos((u + p["s"]) / (1 + p["s"]) * math.pi / 2) ** 2

        values = [min(1 - alpha_bar_fn((i + 1) / T) / alpha_bar_fn(i / T), p["max_beta"]) for i in range(T)]
        return torch.tensor(values, dtype=f64)

    start, end = p["beta_start"], p["beta_end"]
    if not 0 < start <= end < 1:
        raise ValueError(f"schedule {kind!r} needs 0 < beta_start <= beta_end < 1, got {start}, {end}")
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=f64)
    if kind == "quadratic":
        return torch.linspace(start**0.5, end**0.5, T, dtype=f64) ** 2
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=f64)) * (end - start) + start


def alpha_bars(kind: str, num_timesteps: int, **params: float) -> torch.Tensor:
    """``alpha_bar[t] = prod_{s <= t} (1 - beta_s)`` (float64, shape ``(T,)``, strictly decreasing)."""
    return torch.cumprod(1.0 - betas(kind, num_timesteps, **params), dim=0)


def rescale_zero_terminal_snr(alpha_bars: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1: shift and scale ``sqrt(alpha_bar)`` so that it keeps its first
    value and ends at exactly 0, i.e. the last timestep is pure noise (zero SNR) as at inference.

    ``sqrt_ab <- (sqrt_ab - sqrt_ab[-1]) * sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[-1])``. The model can
    then no longer be an eps predictor (x0 = (x_T - eps) / 0); train it with ``v`` or ``x0``
    prediction, and sample with a spacing that visits ``T - 1`` (``trailing``, ``linspace`` or
    ``logsnr``; ``uniform`` never starts from pure noise).
    """
    root = alpha_bars.to(torch.float64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    if not first > last:
        raise ValueError("rescale_zero_terminal_snr needs a strictly decreasing alpha_bar table")
    root = (root - last) * first / (first - last)
    return root**2


def timesteps(
    num_timesteps: int, steps: int | None, spacing: str = "uniform", alpha_bars: torch.Tensor | None = None
) -> torch.Tensor:
    """The training timesteps a sampler visits, as a strictly decreasing LongTensor.

    ``spacing`` is one of:

    * ``uniform``: the DDIM code's ``range(0, T, T // S)``, cut to exactly S steps (diffusers'
      ``leading`` spacing with ``steps_offset=0``).
    * ``quad``: the DDIM code's ``int(linspace(0, sqrt(0.8 T), S) ** 2)``. Where that yields
      repeated steps (large S), each repeat is moved up to the next free timestep so that S
      distinct steps remain; when it yields none, the result is the DDIM code's exactly.
    * ``linspace``: ``round(linspace(0, T - 1, S))`` (diffusers' ``linspace``).
    * ``trailing``: ``round(T - i T / S) - 1`` for ``i < S`` (diffusers' ``trailing``; starts at T-1).
    * ``lcm``: ``T - 1 - floor(i T / S)``, the trailing grid rounded down (diffusers' ``LCMScheduler``
      with ``original_inference_steps = T``); the same as ``trailing`` wherever ``i T / S`` is whole.
      Consistency and DMD students sample on it, so that their export steps the same times.
    * ``logsnr``: the timesteps nearest to S values of log-SNR ``lambda = log(sqrt(alpha_bar /
      (1 - alpha_bar)))`` evenly spaced from ``lambda[T-1]`` to ``lambda[0]`` (repeats moved up as
      for ``quad``); needs ``alpha_bars``. It suits DPM-Solver, which steps in lambda.
    * improved-diffusion's section strings (``space_timesteps``): ``"10,15,20"`` splits T into
      three near-equal sections strided to 10, 15 and 20 steps; ``"ddim25"`` is the integer stride
      that gives exactly 25 steps. ``steps`` may then be None, or must equal the total.
    """
    T = num_timesteps
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {T!r}")
    if spacing not in SPACINGS:
        kept = _section_timesteps(T, spacing)
        if steps is not None and steps != len(kept):
            raise ValueError(f"spacing {spacing!r} gives {len(kept)} steps, but steps={steps} was asked for")
        return torch.tensor(sorted(kept, reverse=True), dtype=torch.long)

    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer from 1 to {T} (the model's T), got {steps!r}")
    S = steps
    if spacing == "uniform":
        kept = [i * (T // S) for i in range(S)]
    elif spacing == "quad":
        raw = torch.linspace(0, math.sqrt(T * 0.8), S, dtype=torch.float64) ** 2
        kept = _make_distinct([int(v) for v in raw.tolist()], T)
    elif spacing == "linspace":
        kept = torch.linspace(0, T - 1, S, dtype=torch.float64).round().long().tolist()
    elif spacing == "trailing":
        kept = (torch.round(T - torch.arange(S, dtype=torch.float64) * (T / S)) - 1).long().tolist()
    elif spacing == "lcm":
        kept = [T - 1 - (i * T) // S for i in range(S)]
    else:  # logsnr
        if alpha_bars is None or len(alpha_bars) != T:
            raise ValueError(f"spacing 'logsnr' needs the schedule's alpha_bars (T={T})")
        log_snr = spaceable_log_snr(alpha_bars)
        targets = torch.linspace(float(log_snr[0]), float(log_snr[-1]), S, dtype=torch.float64)
        kept = _make_distinct(nearest_timesteps(log_snr, targets), T)
        if T > 1 and bool(alpha_bars[-1] == 0):  # zero terminal SNR: start from pure noise itself
            kept[-1] = T - 1
    return torch.tensor(sorted(kept, reverse=True), dtype=torch.long)


def spaceable_log_snr(alpha_bars: torch.Tensor) -> torch.Tensor:
    """``lambda = log(sqrt(alpha_bar / (1 - alpha_bar)))`` per timestep, float64, decreasing in t; a
    zero-SNR last step's -inf, which cannot be spaced evenly, takes the step before's value (so the
    nearest timestep to it is that step, the first of the tie)."""
    ab = alpha_bars.detach().to("cpu", torch.float64)
    log_snr = 0.5 * torch.log(ab / (1 - ab))
    if len(ab) > 1 and ab[-1] == 0:
        log_snr[-1] = log_snr[-2]
    return log_snr


def nearest_timesteps(log_snr: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """The timestep whose ``log_snr`` is nearest to each target (non-decreasing in t for decreasing
    targets; the first on a tie)."""
    return (log_snr[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()


def _make_distinct(ascending: list[int], T: int) -> list[int]:
    """Push repeats of a non-decreasing list up to the next free value, keeping all below T."""
    out: list[int] = []
    for value in ascending:
        out.append(max(value, out[-1] + 1) if out else value)
    # Pushing up can overflow past T - 1 only when S is close to T; pull the tail back down.
    for i in range(len(out) - 1, -1, -1):
        out[i] = min(out[i], T - len(out) + i)
    return out


def _section_timesteps(T: int, sections: str) -> set[int]:
    """improved-diffusion's ``space_timesteps`` (respace.py), with errors that name the numbers."""
    text = sections.strip()
    if text.startswith("ddim"):
        try:
            desired = int(text[len("ddim") :])
        except ValueError:
            raise ValueError(f"spacing {sections!r}: expected 'ddimN' with an integer N") from None
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == desired:
                return set(range(0, T, stride))
        raise ValueError(f"spacing {sections!r}: no integer stride gives exactly {desired} of {T} steps")
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"unknown spacing {sections!r}; use one of {', '.join(SPACINGS)}, "
            "a section list such as '10,15,20', or 'ddimN'"
        ) from None
    if any(c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"spacing {sections!r}: section counts must be >= 0 with at least one step")
    if len(counts) > T:
        raise ValueError(f"spacing {sections!r}: {len(counts)} sections cannot split {T} timesteps")
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"spacing {sections!r}: cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)
