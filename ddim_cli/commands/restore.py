"""ddim restore: zero-shot inpainting, super-resolution, denoising and colourisation."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ddim_cli.commands.errors import user_errors
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
    SeedOpt,
    SkipOpt,
    StepsOpt,
    ThreadsOpt,
    npz_option,
    out_folder_option,
)
from ddim_cli.commands.progress import progress_bar, rank_progress
from ddim_cli.commands.running import (
    check_outputs,
    checkpoint_and_images,
    job_on_ranks,
    parse_classes,
    rescale_or_config,
)


class RestoreMethod(str, Enum):
    ddnm = "ddnm"
    repaint = "repaint"


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
    from ddim_cli.acceleration import job_size
    from ddim_cli.conditioning import cycled_labels
    from ddim_cli.jobs import restore as r
    from ddim_cli.models import noise_model
    from ddim_cli.restoration import model_calls
    from ddim_cli.sampler_choice import choose_sampler

    checkpoint, images_in = checkpoint_and_images(paths, "restore")
    with user_errors():
        r.check_degradation_options(mask, sr, sigma, gray, method.value)
    default_jump, default_resample = r.TIME_TRAVEL[method.value]
    jump, resample = jump or default_jump, resample or default_resample
    outputs = {"files": [("--npz", npz)], "directories": [("--out", out)], "inputs": [checkpoint, *images_in]}
    with job_on_ranks(device, checkpoint, ema, **outputs, full_model_for="ddim restore") as (shard, loaded):
        directory = out or loaded.run_dir / "restore"
        check_outputs(directories=[("--out", directory)])
        seed = loaded.config.sample.seed if seed is None else seed
        degradation = r.degradation_for(loaded, mask=mask, sr=sr, sigma=sigma, gray=gray, seed=seed, images=images_in)
        count = len(images_in)
        labels = cycled_labels(loaded, parse_classes(class_label), guidance or 0.0, count)
        originals, observations, notes = r.restore_inputs(
            loaded, degradation, images_in, degrade=degrade, seed=seed, sr=sr
        )
        for note in notes:
            typer.echo(f"note: {note}", err=True)
        w = 0.0 if labels is None else (loaded.config.sample.guidance if guidance is None else guidance)
        spec = choose_sampler(loaded, "ddim", steps, eta, skip, clip_x0=clip_x0)
        calls = model_calls(len(spec.timesteps(loaded.alpha_bars)), jump, resample)
        size = job_size(count * n_samples, calls, batch_size, guided=bool(w))
        rescale = rescale_or_config(loaded, guidance_rescale)
        make_eps = noise_model(loaded, guidance=w, guidance_rescale=rescale, size=size, threads=threads)
        with progress_bar(
            count * n_samples * calls, progress and shard.main, f"restore ({method.value}) S={spec.steps}"
        ) as bar:
            how = {"method": method.value, "jump": jump, "resample": resample, "samples_per_input": n_samples}
            restored = r.restore_images(
                loaded,
                make_eps,
                observations,
                degradation,
                spec,
                labels=labels,
                seed=seed,
                **how,
                batch_size=batch_size,
                progress=rank_progress(bar, shard),
                shard=shard,
            )
    if not shard.main:  # rank 0 writes
        return
    with user_errors():
        names = [str(path) for path in images_in]
        scores, written = r.write_restorations(
            directory, restored, observations, degradation, names, originals=originals, npz=npz
        )
    for line in _summary(scores, method, count, n_samples, sigma, spec, jump, resample, labels, w):
        typer.echo(line)
    typer.echo("wrote " + ", ".join(written))


def _summary(scores, method, count, n_samples, sigma, spec, jump, resample, labels, w) -> list[str]:
    from ddim_cli.conditioning import class_summary

    how = method.value + (" (DDNM+)" if sigma and method is RestoreMethod.ddnm else "")
    travel = f", time travel jump {jump} x {resample}" if resample > 1 else ""
    lines = [
        f"restored {count} image(s) x {n_samples} with {how}, {spec.label}{travel}"
        + (f", class {class_summary(labels)} guidance {w:g}" if labels is not None else "")
        + f"; observation error (RMS of A x - y) {max(scores.observation_errors):.3g} at most"
    ]
    if scores.psnr is not None:
        lines.append(
            f"PSNR {sum(scores.psnr) / len(scores.psnr):.2f} dB against the originals "
            f"(degraded input shown at full size: {sum(scores.degraded_psnr) / len(scores.degraded_psnr):.2f} dB)"
        )
    return lines
