"""ddim restore: zero-shot inpainting, super-resolution, denoising and colourisation."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.common import (
    check_outputs,
    checkpoint_and_images,
    class_summary,
    fail,
    invert_labels,
    load_inputs,
    load_run,
    progress_bar,
    rank_progress,
    refuse_students,
    rescale_or_config,
    sampler_spec,
    user_errors,
)
from ddim_cli.commands.options import (
    SAMPLER_PANEL,
    BatchOpt,
    CheckpointAndImagesArg,
    Device,
    DeviceOpt,
    EmaOpt,
    GuidanceRescaleOpt,
    InvertClassesOpt,
    ProgressOpt,
    SampleGuidanceOpt,
    Sampler,
    SeedOpt,
    SkipOpt,
    StepsOpt,
    ThreadsOpt,
    Variance,
    npz_option,
    out_folder_option,
)


class RestoreMethod(str, Enum):
    ddnm = "ddnm"
    repaint = "repaint"


# Time travel per method (jump, resample): DDNM's authors sample without it; RePaint's paper
# resamples 10 times with jumps of 10 (over 250 steps).
_RESTORE_TRAVEL = {RestoreMethod.ddnm: (1, 1), RestoreMethod.repaint: (10, 10)}


def _check_degradation_options(mask: str | None, sr: int | None, sigma: float, gray: bool) -> None:
    """One-line errors (exit 2) for degradation options that cannot work on any model."""
    import math

    if mask is None and sr is None and not sigma and not gray:
        fail("give a degradation to undo: --mask PRESET|FILE, --sr F, --sigma S and/or --gray", code=2)
    if not (sigma >= 0 and math.isfinite(sigma)):
        fail(f"--sigma is a noise standard deviation on the [-1, 1] scale and must be >= 0, got {sigma:g}", code=2)
    if sr is not None and sr < 2:
        fail(f"--sr is the downscaling factor and must be an integer >= 2, got {sr}", code=2)
    if mask is not None and sr is not None:
        fail("--mask and --sr cannot be combined (the mask is at the model's resolution); restore in two runs", code=2)


def _degradation(loaded, mask: str | None, sr: int | None, sigma: float, gray: bool, seed: int, images: list[Path]):
    """The degradation the options describe, checked against the model (one-line errors)."""
    from ddim_cli import restoration as r
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.images import image_sizes, load_mask
    from ddim_cli.jobs.restore import mask_generator

    channels, size, _ = loaded.image_shape
    parts = []
    if gray:
        if channels != 3:
            raise CheckpointError(f"--gray colourises RGB models; this model has {channels} channel(s)")
        parts.append(r.Colorization())
    if sr is not None:
        if size % sr:
            divisors = ", ".join(str(f) for f in range(2, size + 1) if size % f == 0)
            raise CheckpointError(f"--sr {sr} does not divide the model's resolution {size}; use one of {divisors}")
        parts.append(r.SuperResolution(sr))
    if mask is not None:
        if mask in r.MASK_PRESETS or mask.startswith("random:"):
            known = r.mask_preset(mask, size, size, mask_generator(seed))
        elif Path(mask).is_file():
            sizes = set(image_sizes(images))
            known = load_mask(Path(mask), size, sizes.pop() if len(sizes) == 1 else None)
        else:
            raise CheckpointError(
                f"--mask {mask!r} is neither a preset ({', '.join(r.MASK_PRESETS)}, random:P) nor an image file"
            )
        parts.append(r.Inpainting(known))
    if not parts:
        return r.Denoising(sigma)
    return parts[0] if len(parts) == 1 and not sigma else r.Composed(parts, sigma)


def _observations(loaded, degradation, images: list[Path], sr: int | None):
    """Degraded input images as observations ``y``: the shape A gives (e.g. H/F for --sr, one
    channel for --gray); a mask's missing pixels are zeroed whatever the file holds there."""
    import torch

    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.data import resize_mode
    from ddim_cli.images import image_sizes, load_images

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
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    observed = degradation.observed(y)
    return y if observed is None else torch.where(observed, y, torch.zeros_like(y))


def restore(
    paths: CheckpointAndImagesArg,
    mask: Annotated[
        str | None,
        typer.Option(
            "--mask",
            metavar="PRESET|FILE",
            help="Inpainting: fill missing pixels. A PNG where white marks what to fill (the model's size or the "
            "inputs'), or bottom-half, top-half, left-half, right-half, center, random:P (a fraction P missing, "
            "drawn from --seed).",
            show_default=False,
        ),
    ] = None,
    sr: Annotated[
        int | None,
        typer.Option(
            "--sr",
            metavar="F",
            help="Super-resolution: the inputs are the images average-pooled by F.",
            show_default=False,
        ),
    ] = None,
    sigma: Annotated[
        float,
        typer.Option("--sigma", help="Denoising: Gaussian noise of this standard deviation on the [-1, 1] scale."),
    ] = 0.0,
    gray: Annotated[
        bool, typer.Option("--gray", help="Colourisation of an RGB model: the inputs are grayscale.")
    ] = False,
    degrade: Annotated[
        bool,
        typer.Option(
            "--degrade",
            help="The inputs are clean images: degrade them here (noise from --seed), restore, and report PSNR.",
        ),
    ] = False,
    method: Annotated[
        RestoreMethod,
        typer.Option(
            "--method",
            help="ddnm: range-null-space DDIM (Wang et al. 2022; DDNM+ when --sigma > 0); repaint: the observed "
            "part re-noised from the input at every step (Lugmayr et al. 2022; noiseless inputs only).",
        ),
    ] = RestoreMethod.ddnm,
    jump: Annotated[
        int | None,
        typer.Option(
            "--jump",
            min=1,
            help="Time travel: steps to go back up each time (default: ddnm 1, repaint 10).",
            show_default=False,
        ),
    ] = None,
    resample: Annotated[
        int | None,
        typer.Option(
            "--resample",
            min=1,
            help="Time travel: times each jump point is passed (1: none; default: ddnm 1, repaint 10, as in "
            "RePaint); costs about that many times the model calls.",
            show_default=False,
        ),
    ] = None,
    class_label: InvertClassesOpt = None,
    guidance: SampleGuidanceOpt = None,
    guidance_rescale: GuidanceRescaleOpt = None,
    steps: StepsOpt = None,
    eta: Annotated[
        float,
        typer.Option(
            "--eta",
            min=0.0,
            help="DDIM eta of each step: 1 (DDPM-like, as RePaint samples) measured best on the digits; 0 is "
            "deterministic.",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = 1.0,
    skip: SkipOpt = None,
    clip_x0: Annotated[
        bool,
        typer.Option(
            "--clip-x0/--no-clip-x0",
            help="Clamp predicted x_0 to [-1, 1], so that the result is the nearest image in [-1, 1] with A x = y "
            "(whatever the config's sample.clip_x0); --no-clip-x0 is the paper's unclamped projection.",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = True,
    seed: SeedOpt = None,
    n_samples: Annotated[
        int, typer.Option("--n-samples", min=1, help="Restorations per input (seeds differ), to show the uncertainty.")
    ] = 1,
    out: out_folder_option("restore") = None,
    npz: npz_option("the restorations, in input order", "N x n-samples, H, W, C") = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = Device.auto,
    threads: ThreadsOpt = None,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
) -> None:
    """Restore images with a trained model, zero-shot: inpainting, super-resolution, denoising, colourisation.

    The inputs are degraded images (for --sr F the low-resolution ones, for --gray grayscale ones),
    or clean ones with --degrade. Restoration k = i * n-samples + j (input i, sample j) starts from
    seed + k. Writes grid.png (rows: original with --degrade, degraded input, restorations),
    restored/NNNNNN.png (numbered k), and metrics.csv: PSNR against the original (--degrade), the
    degraded input's PSNR shown at full size, and the observation error, the RMS of A(x) - y over
    the observed values (~0 for noiseless inputs: known pixels are kept). Under torchrun the
    ranks share every batch; rank 0 writes.
    """
    from ddim_cli import distributed
    from ddim_cli.acceleration import job_size
    from ddim_cli.jobs.restore import degrade_images, restore_images, write_restorations
    from ddim_cli.models import noise_model
    from ddim_cli.restoration import model_calls

    checkpoint, images_in = checkpoint_and_images(paths, "restore")
    _check_degradation_options(mask, sr, sigma, gray)
    if method is RestoreMethod.repaint and sigma:
        fail("--method repaint assumes noiseless inputs; use --method ddnm (DDNM+) with --sigma", code=2)
    default_jump, default_resample = _RESTORE_TRAVEL[method]
    jump, resample = jump or default_jump, resample or default_resample
    with user_errors():
        shard, where = distributed.setup(device.value)  # one process, or one of torchrun's
        check_outputs([("--npz", npz)], [("--out", out)], inputs=[checkpoint, *images_in])
        loaded = load_run(checkpoint, ema, device, where)
        refuse_students(loaded, "ddim restore")
        directory = out or loaded.run_dir / "restore"
        check_outputs(directories=[("--out", directory)])
        seed = loaded.config.sample.seed if seed is None else seed
        degradation = _degradation(loaded, mask, sr, sigma, gray, seed, images_in)
        count = len(images_in)
        labels = invert_labels(loaded, class_label, guidance or 0.0, count)
        if degrade:
            originals = load_inputs(loaded, images_in)
            observations = degrade_images(degradation, originals, seed)
        else:
            originals, observations = None, _observations(loaded, degradation, images_in, sr)
        w = 0.0 if labels is None else (loaded.config.sample.guidance if guidance is None else guidance)
        spec = sampler_spec(loaded, Sampler.ddim, steps, eta, skip, Variance.posterior, clip_x0)
        calls = model_calls(len(spec.timesteps(loaded.alpha_bars)), jump, resample)
        size = job_size(count * n_samples, calls, batch_size, guided=bool(w))
        rescale = rescale_or_config(loaded, guidance_rescale)
        make_eps = noise_model(loaded, guidance=w, guidance_rescale=rescale, size=size, threads=threads)
        desc = f"restore ({method.value}) S={spec.steps}"
        with progress_bar(count * n_samples * calls, progress and shard.main, desc) as bar:
            restored = restore_images(
                loaded,
                make_eps,
                observations,
                degradation,
                spec,
                labels=labels,
                seed=seed,
                samples_per_input=n_samples,
                method=method.value,
                jump=jump,
                resample=resample,
                batch_size=batch_size,
                progress=rank_progress(bar, shard),
                shard=shard,
            )
        distributed.finish(shard)
        if not shard.main:  # rank 0 writes
            return
        names = [str(path) for path in images_in]
        scores, written = write_restorations(
            directory, restored, observations, degradation, names, originals=originals, npz=npz
        )
    how = method.value + (" (DDNM+)" if sigma and method is RestoreMethod.ddnm else "")
    travel = f", time travel jump {jump} x {resample}" if resample > 1 else ""
    typer.echo(
        f"restored {count} image(s) x {n_samples} with {how}, {spec.label}{travel}"
        + (f", class {class_summary(labels)} guidance {w:g}" if labels is not None else "")
        + f"; observation error (RMS of A x - y) {max(scores.observation_errors):.3g} at most"
    )
    if scores.psnr is not None:
        typer.echo(
            f"PSNR {sum(scores.psnr) / len(scores.psnr):.2f} dB against the originals "
            f"(degraded input shown at full size: {sum(scores.degraded_psnr) / len(scores.degraded_psnr):.2f} dB)"
        )
    typer.echo("wrote " + ", ".join(written))
