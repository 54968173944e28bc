"""ddim invert: real images to latents (plain, exact or null-text inversion)."""

from __future__ import annotations

from typing import Annotated

import typer

from ddim_cli.commands.errors import fail, user_errors
from ddim_cli.commands.options import (
    BatchOpt,
    CheckpointAndImagesArg,
    CompileOpt,
    Device,
    DeviceOpt,
    EmaOpt,
    ExactOpt,
    GuidanceOpt,
    GuidanceRescaleOpt,
    InvertClassesOpt,
    InvertPrecisionOpt,
    MaxIterOpt,
    Precision,
    ProgressOpt,
    SkipOpt,
    StepsOpt,
    ThreadsOpt,
    TolOpt,
    out_folder_option,
)
from ddim_cli.commands.progress import progress_bar
from ddim_cli.commands.running import (
    auto_switch,
    check_outputs,
    checkpoint_and_images,
    load_inputs,
    load_run,
    parse_classes,
    rescale_or_config,
)
from ddim_cli.inversion_defaults import EXACT_TOL, NULL_TEXT_INNER_STEPS


def _summary_of_exact_inversion(report, images: list, steps: int, tol: float, max_iter: int) -> list[str]:
    """How exact inversion kept its promise: calls per step, and every image that missed --tol."""
    calls = sum(image.model_calls for image in report) / len(report) / steps
    worst = max(image.reconstruction_rms for image in report)
    lines = [f"exact inversion: {calls:.1f} model calls per step and image on average (plain: 1), checks included"]
    missed = [(path, image) for path, image in zip(images, report, strict=True) if not image.converged]
    if not missed:
        lines[0] += f"; every image reconstructs within --tol {tol:.2g} RMS (worst {worst:.2g})"
        return lines
    lines[0] += f"; {len(missed)} of {len(report)} image(s) missed --tol {tol:.2g} RMS:"
    lines += [
        f"  {path}: reconstruction RMS {image.reconstruction_rms:.2g} after {image.rounds} passes "
        f"(--max-iter {max_iter} per step and pass: raise it, or accept this)"
        for path, image in missed
    ]
    return lines


def _check_options(count: int, interpolate: bool, tol: float, null_text: bool, classes, guidance: float) -> None:
    if interpolate and count != 2:
        fail(f"--interpolate needs exactly two images, got {count}", code=2)
    if not tol > 0:
        fail(f"--tol must be > 0, got {tol:g}", code=2)
    if null_text and (classes is None or not guidance):
        fail("--null-text needs --class K and --guidance W > 0 (unguided inversion is faithful as it is)", code=2)
    if null_text and interpolate:
        fail("--interpolate works on plain or --exact latents; drop --null-text", code=2)


def invert(
    paths: CheckpointAndImagesArg,
    steps: StepsOpt = None,
    skip: SkipOpt = None,
    class_label: InvertClassesOpt = None,
    guidance: GuidanceOpt = 0.0,
    guidance_rescale: GuidanceRescaleOpt = None,
    exact: ExactOpt = False,
    max_iter: MaxIterOpt = 10,
    tol: TolOpt = EXACT_TOL,
    null_text: Annotated[
        bool,
        typer.Option(
            "--null-text",
            help="With --class K --guidance W: null-text inversion (Mokady et al. 2022), fitting the null "
            "label's embedding per step so that guided sampling reconstructs the image; writes "
            "null_embeddings.safetensors for `ddim sample --null-embeddings` (runs in fp32, eager).",
        ),
    ] = False,
    inner_steps: Annotated[
        int, typer.Option("--inner-steps", min=0, help="--null-text: most Adam iterations per step.")
    ] = NULL_TEXT_INNER_STEPS,
    null_lr: Annotated[
        float, typer.Option("--null-lr", min=0.0, help="--null-text: Adam learning rate on the null embedding.")
    ] = 0.1,
    early_stop: Annotated[
        float,
        typer.Option(
            "--early-stop", min=0.0, help="--null-text: a step stops once its per-dimension loss is below this."
        ),
    ] = 1e-5,
    interpolate: Annotated[
        int,
        typer.Option("--interpolate", min=0, help="With two images: decode N frames slerped between their latents."),
    ] = 0,
    out: out_folder_option("invert") = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = Device.auto,
    threads: ThreadsOpt = None,
    precision: InvertPrecisionOpt = Precision.fp32,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
    compile_model: CompileOpt = None,
) -> None:
    """Invert real images to latents with deterministic DDIM, reconstruct them, and report the error.

    Plain inversion takes each step's noise where the step starts, an error of the order of the
    step; --exact solves each step for the latent that DDIM maps back exactly. Writes latents.npy
    (usable with `ddim sample --latents`), grid.png (originals, reconstructions, latents),
    metrics.csv (per-dimension MSE on [-1, 1] and PSNR) and, with --interpolate, interpolation.png.
    """
    from ddim_cli.conditioning import cycled_labels
    from ddim_cli.jobs.invert import invert_to_folder
    from ddim_cli.models import require_full_model
    from ddim_cli.sampler_choice import choose_sampler

    checkpoint, images_in = checkpoint_and_images(paths, "invert")
    _check_options(len(images_in), interpolate, tol, null_text, class_label, guidance)
    with user_errors():
        check_outputs([], [("--out", out)], inputs=[checkpoint, *images_in])
        loaded = load_run(checkpoint, ema, device)
        require_full_model(loaded, "ddim invert")
        directory = out or loaded.run_dir / "invert"
        check_outputs(directories=[("--out", directory)])
        originals = load_inputs(loaded, images_in)
        # No clipping either way: clipping x0 while decoding would leave the ODE that inversion follows.
        spec = choose_sampler(loaded, "ddim", steps, 0.0, skip, clip_x0=False)
        steps_run = len(spec.timesteps(loaded.alpha_bars))
        with progress_bar(2 * len(originals) * steps_run, progress, f"invert + reconstruct S={spec.steps}") as bar:
            run = invert_to_folder(
                loaded,
                originals,
                [str(path) for path in images_in],
                spec,
                directory,
                labels=cycled_labels(loaded, parse_classes(class_label), guidance, len(originals)),
                guidance=guidance,
                guidance_rescale=rescale_or_config(loaded, guidance_rescale),
                exact=exact,
                max_iter=max_iter,
                tol=tol,
                null_text=null_text,
                inner_steps=inner_steps,
                lr=null_lr,
                early_stop=early_stop,
                interpolate=interpolate,
                precision=precision.value,
                compile=auto_switch(compile_model),
                threads=threads,
                batch_size=batch_size,
                progress=bar.update,
            )
    for path, (mse, psnr) in zip(images_in, run.metrics, strict=True):
        typer.echo(f"{path}: MSE {mse:.4g} per dimension, PSNR {psnr:.2f} dB")
    if exact:
        for line in _summary_of_exact_inversion(run.report, images_in, steps_run, tol, max_iter):
            typer.echo(line)
    if null_text:
        typer.echo(
            f"null-text inversion at guidance {guidance:g}: largest step loss "
            f"{float(run.null_text.step_losses.max()):.3g} (early stop {early_stop:g}); reproduce with: ddim sample "
            f"{loaded.checkpoint} --latents {directory}/latents.npy --null-embeddings "
            f"{directory}/null_embeddings.safetensors --steps {spec.steps} --skip {spec.skip} --no-clip-x0"
        )
    mean = sum(m for m, _ in run.metrics) / len(run.metrics)
    typer.echo(f"inverted {len(originals)} image(s) with {spec.label} from {loaded.checkpoint}; mean MSE {mean:.4g}")
    typer.echo(f"wrote {directory}/ ({', '.join(run.written)})")
