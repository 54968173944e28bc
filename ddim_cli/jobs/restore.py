"""What ``ddim restore`` does: degraded images restored with a trained model (DDNM, RePaint and
their time travel), and the files the command writes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ddim_cli.batches import in_batches, pick, step_counter
from ddim_cli.checkpoint import CheckpointError
from ddim_cli.data import resize_mode
from ddim_cli.distributed import Shard
from ddim_cli.images import image_sizes, load_images, load_mask, save_grid, save_npz, save_pngs, to_uint8
from ddim_cli.jobs.invert import reconstruction_metrics
from ddim_cli.models import LoadedModel, MakeEps, Progress, SamplerSpec
from ddim_cli.outputs import write_text_whole
from ddim_cli.restoration import (
    MASK_PRESETS,
    Colorization,
    Composed,
    Degradation,
    Denoising,
    Inpainting,
    SuperResolution,
    mask_preset,
    model_calls,
    restore,
)
from ddim_cli.seeding import seeded_noise, side_generator

# Time travel per method (jump, resample): DDNM's authors sample without it; RePaint's paper
# resamples 10 times with jumps of 10 (over 250 steps).
TIME_TRAVEL = {"ddnm": (1, 1), "repaint": (10, 10)}
# Keys of the degradation's own random streams (seeding.side_generator), apart from the images'.
DEGRADE_NOISE, RANDOM_MASK = 1, 2


def mask_generator(seed: int) -> torch.Generator:
    """The generator a ``random:P`` mask is drawn from for ``--seed seed``."""
    return side_generator(seed, RANDOM_MASK)


def check_degradation_options(mask: str | None, sr: int | None, sigma: float, gray: bool, method: str) -> None:
    """A ValueError for degradation options that cannot work on any model."""
    if mask is None and sr is None and not sigma and not gray:
        raise ValueError("give a degradation to undo: --mask PRESET|FILE, --sr F, --sigma S and/or --gray")
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"--sigma is a noise standard deviation on the [-1, 1] scale and must be >= 0, got {sigma:g}")
    if sr is not None and sr < 2:
        raise ValueError(f"--sr is the downscaling factor and must be an integer >= 2, got {sr}")
    if mask is not None and sr is not None:
        raise ValueError(
            "--mask and --sr cannot be combined (the mask is at the model's resolution); restore in two runs"
        )
    if method == "repaint" and sigma:
        raise ValueError("--method repaint assumes noiseless inputs; use --method ddnm (DDNM+) with --sigma")


def degradation_for(
    loaded: LoadedModel,
    *,
    mask: str | None = None,
    sr: int | None = None,
    sigma: float = 0.0,
    gray: bool = False,
    seed: int = 0,
    images: Sequence[Path] = (),
) -> Degradation:
    """The degradation ``ddim restore``'s options describe, checked against the model (one-line
    CheckpointErrors): ``gray`` colourisation, ``sr`` x F average pooling, a ``mask`` (a preset, a
    ``random:P`` mask drawn from ``seed``, or an image file at the model's size or the ``images``'),
    plus noise of standard deviation ``sigma``."""
    channels, size, _ = loaded.image_shape
    parts = []
    if gray:
        if channels != 3:
            raise CheckpointError(f"--gray colourises RGB models; this model has {channels} channel(s)")
        parts.append(Colorization())
    if sr is not None:
        if size % sr:
            divisors = ", ".join(str(f) for f in range(2, size + 1) if size % f == 0)
            raise CheckpointError(f"--sr {sr} does not divide the model's resolution {size}; use one of {divisors}")
        parts.append(SuperResolution(sr))
    if mask is not None:
        if mask in MASK_PRESETS or mask.startswith("random:"):
            known = mask_preset(mask, size, size, mask_generator(seed))
        elif Path(mask).is_file():
            sizes = set(image_sizes(images))
            known = load_mask(Path(mask), size, sizes.pop() if len(sizes) == 1 else None)
        else:
            raise CheckpointError(
                f"--mask {mask!r} is neither a preset ({', '.join(MASK_PRESETS)}, random:P) nor an image file"
            )
        parts.append(Inpainting(known))
    if not parts:
        return Denoising(sigma)
    return parts[0] if len(parts) == 1 and not sigma else Composed(parts, sigma)


def load_observations(
    loaded: LoadedModel, degradation: Degradation, images: Sequence[Path], sr: int | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Degraded image files as observations ``y`` in the shape A gives (H/F for ``sr``, one channel
    for colourisation; a mask's missing pixels zeroed whatever the file holds there), and notes on
    how they were read."""
    channels, size, _ = degradation.observation_shape(loaded.image_shape)
    if sr is not None:
        full = loaded.config.data.image_size
        for path, (w, h) in zip(images, image_sizes(images), strict=True):
            if (w, h) == (full, full):
                raise CheckpointError(
                    f"{path} is {w}x{h}, the model's size; with --sr {sr} the inputs are the {size}x{size} "
                    "low-resolution images (or add --degrade to give clean images)"
                )
    y, notes = load_images(images, size, channels, resize_mode(loaded.config.data))
    observed = degradation.observed(y)
    return (y if observed is None else torch.where(observed, y, torch.zeros_like(y))), notes


def restore_inputs(
    loaded: LoadedModel, degradation: Degradation, images: Sequence[Path], *, degrade: bool, seed: int, sr: int | None
) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    """``(originals, observations, notes)`` from image files: clean images degraded here with
    ``seed``'s noise (``degrade``), or degraded ones read as observations (originals None); notes
    say how the files were read."""
    if not degrade:
        observations, notes = load_observations(loaded, degradation, images, sr)
        return None, observations, notes
    data = loaded.config.data
    originals, notes = load_images(images, data.image_size, data.channels, resize_mode(data))
    return originals, degrade_images(degradation, originals, seed), notes


def degrade_images(degradation: Degradation, images: torch.Tensor, seed: int) -> torch.Tensor:
    """``A x + sigma n`` of clean images in [-1, 1]; image ``i``'s noise comes from its own side
    generator (``side_generator(seed, DEGRADE_NOISE, i)``), never from a restoration's stream."""
    shape = degradation.observation_shape(tuple(images.shape[1:]))
    noise = None
    if degradation.sigma:
        generators = [side_generator(seed, DEGRADE_NOISE, i) for i in range(len(images))]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return degradation.observe(images, noise)


def restore_images(
    loaded: LoadedModel,
    make_eps: MakeEps,
    observations: torch.Tensor,
    degradation: Degradation,
    spec: SamplerSpec,
    *,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    samples_per_input: int = 1,
    method: str = "ddnm",
    jump: int = 1,
    resample: int = 1,
    batch_size: int,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> torch.Tensor:
    """``samples_per_input`` restorations of each observation (input-major: restoration ``j`` of
    input ``i`` is image ``k = i * samples_per_input + j``, drawn from seed ``seed + k``), with
    ``labels`` (one per input; None: the null label) and the config's guidance in ``make_eps``.
    Returns (N * samples_per_input, C, H, W) on the CPU, unclamped."""
    ab = loaded.alpha_bars
    ts = spec.timesteps(ab)
    model_calls(len(ts), jump, resample)  # checks jump and resample before any work
    if not (isinstance(samples_per_input, int) and samples_per_input >= 1):
        raise ValueError(f"samples_per_input must be an integer >= 1, got {samples_per_input!r}")
    expected = degradation.observation_shape(loaded.image_shape)
    if tuple(observations.shape[1:]) != tuple(expected):
        raise ValueError(f"the observations have shape {tuple(observations.shape[1:])}; this model needs {expected}")
    repeated = observations.repeat_interleave(samples_per_input, 0)
    labels = None if labels is None else labels.repeat_interleave(samples_per_input, 0)
    x_T, generators = seeded_noise(loaded.image_shape, list(range(seed, seed + len(repeated))))

    def run(index: list[int], batch: torch.Tensor) -> torch.Tensor:
        count = len(batch)
        return restore(
            make_eps(pick(labels, index)),
            repeated[index],
            degradation,
            ab,
            ts,
            batch,
            method=method,
            eta=spec.eta,
            jump=jump,
            resample=resample,
            clip_x0=spec.clip_x0,
            prediction=loaded.prediction,
            generator=[generators[i] for i in index],
            callback=step_counter(progress, count),
        )

    return in_batches(loaded, x_T, batch_size, run, shard)


@dataclass
class RestorationScores:
    """Per restoration k (input ``k // n``, sample ``k % n``): what ``ddim restore`` reports."""

    observation_errors: list[float]  # RMS of A(x) - y over the observed values (~0 without noise)
    psnr: list[float] | None  # dB against the original, when it is known
    degraded_psnr: list[float] | None  # per input: the degraded input shown at full size


def write_restorations(
    directory: Path,
    restored: torch.Tensor,
    observations: torch.Tensor,
    degradation: Degradation,
    names: Sequence[str],
    *,
    originals: torch.Tensor | None = None,
    npz: Path | None = None,
) -> tuple[RestorationScores, list[str]]:
    """What ``ddim restore`` writes into ``directory`` for ``restored`` (input-major, as
    :func:`restore_images` returns them): grid.png (rows: originals if known, degraded inputs,
    then one row per sample), restored/NNNNNN.png (numbered k) and metrics.csv; and the
    restorations as ``npz`` if given."""
    count = len(observations)
    per_input = len(restored) // count
    restored = restored.clamp(-1, 1)
    shown = degradation.show(observations).clamp(-1, 1)
    errors = degradation.observation_error(restored, observations.repeat_interleave(per_input, 0)).tolist()
    psnr = degraded = None
    if originals is not None:
        psnr = [q for _, q in reconstruction_metrics(originals.repeat_interleave(per_input, 0), restored)]
        degraded = [q for _, q in reconstruction_metrics(originals, shown)]
    by_sample = restored.view(count, per_input, *restored.shape[1:]).transpose(0, 1).reshape(restored.shape)
    rows = ([] if originals is None else [originals]) + [shown, by_sample]
    save_grid(torch.cat(rows), directory / "grid.png", nrow=count)
    save_pngs(restored, directory / "restored")
    lines = ["image,sample,psnr_db,psnr_degraded_db,observation_rmse"]
    for k, error in enumerate(errors):
        i, j = divmod(k, per_input)
        scores = "," if psnr is None else f"{psnr[k]:.3f},{degraded[i]:.3f}"
        # Six decimals on the [-1, 1] scale: far finer than a uint8 level; below that is rounding noise.
        lines.append(f"{names[i]},{j},{scores},{error:.6f}")
    write_text_whole(directory / "metrics.csv", "\n".join(lines) + "\n")
    written = [f"{directory}/ (grid.png, restored/, metrics.csv)"]
    if npz is not None:
        save_npz(to_uint8(restored), npz)
        written.append(str(npz))
    return RestorationScores(errors, psnr, degraded), written
