"""ddim sample: images from a checkpoint with DDIM, DPM-Solver++ or DDPM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.common import (
    check_outputs,
    class_summary,
    command_noise_model,
    fail,
    labels_and_guidance,
    load_run,
    parse_classes,
    progress_bar,
    rank_progress,
    rescale_or_config,
    sampler_spec,
    user_errors,
)
from ddim_cli.commands.options import (
    CLASSES_PANEL,
    OUTPUT_PANEL,
    SAMPLER_PANEL,
    BatchOpt,
    CheckpointArg,
    ClassesOpt,
    ClipOpt,
    CompileOpt,
    Device,
    DeviceOpt,
    EmaOpt,
    EtaOpt,
    GuidanceRescaleOpt,
    Precision,
    PrecisionOpt,
    ProgressOpt,
    SampleGuidanceOpt,
    Sampler,
    SeedOpt,
    SkipOpt,
    StepsOpt,
    UnconditionalOpt,
    Variance,
)


def sample(
    checkpoint: CheckpointArg = None,
    steps: StepsOpt = None,
    eta: EtaOpt = None,
    skip: SkipOpt = None,
    sampler: Annotated[
        Sampler,
        typer.Option(
            "--sampler",
            help="ddim; ddpm ancestral sampling; or dpm++2m, DPM-Solver++(2M) (logsnr spacing).",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = Sampler.ddim,
    variance: Annotated[
        Variance, typer.Option("--variance", help="DDPM variance: posterior or beta.", rich_help_panel=SAMPLER_PANEL)
    ] = (Variance.posterior),
    clip_x0: ClipOpt = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Number of images (default: config's sample.n).")] = None,
    batch_size: BatchOpt = 64,
    seed: SeedOpt = None,
    latents: Annotated[
        Path | None,
        typer.Option(
            "--latents",
            help="Start from these x_T (.npy, float32, (N, C, H, W)), from invert or --save-latents (then with the "
            "seed and classes it recorded, unless --seed, --class or --unconditional say otherwise).",
        ),
    ] = None,
    save_latents: Annotated[
        Path | None,
        typer.Option(
            "--save-latents",
            help="Write the x_T used (.npy), and beside it (FILE.json) the seed and classes: --latents FILE then "
            "gives the same images.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    null_embeddings: Annotated[
        Path | None,
        typer.Option(
            "--null-embeddings",
            help="With --latents from `ddim invert --null-text`: guide each step with its fitted null embedding "
            "(DDIM, eta 0, no clipping unless asked), which reproduces the reconstruction; the file's classes "
            "and guidance unless --class / --guidance say otherwise (another class edits the image).",
            rich_help_panel=CLASSES_PANEL,
        ),
    ] = None,
    classes: ClassesOpt = None,
    unconditional: UnconditionalOpt = False,
    guidance: SampleGuidanceOpt = None,
    guidance_rescale: GuidanceRescaleOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Grid PNG (default: in the run's samples/).", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Also write each image as its own PNG here.", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    npz: Annotated[
        Path | None,
        typer.Option(
            "--npz", help="Also write arr_0 = uint8 (N, H, W, C), for FID tools.", rich_help_panel=OUTPUT_PANEL
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="A run into --out-dir / --npz that was interrupted continues where it stopped when run again "
            "with the same options; --no-resume starts afresh.",
        ),
    ] = True,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.auto,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
    compile_model: CompileOpt = None,
) -> None:
    """Sample images from a checkpoint with DDIM, DPM-Solver++ or DDPM.

    A class-conditional model draws each image's class, uniformly, from that image's own seed (so
    every class comes about equally often and an image does not depend on the batch), guided by the
    config's sample.guidance and sample.guidance_rescale; --class picks classes, --unconditional
    uses the null label.

    Writing to --out-dir or --npz, an interrupted run continues where it stopped when the same
    command runs again. Under torchrun the ranks share every batch (--batch-size is all ranks'
    batch) and rank 0 writes: `torchrun --nproc_per_node 8 -m ddim_cli -- sample ...`.
    """
    from time import perf_counter

    import torch

    from ddim_cli import generate as g
    from ddim_cli.images import load_latents
    from ddim_cli.sample_files import SampleFiles
    from ddim_cli.seeding import seeded_noise

    if null_embeddings is not None:
        if latents is None:
            fail("--null-embeddings needs --latents (both written by ddim invert --null-text)", code=2)
        if sampler != Sampler.ddim or eta:
            fail("--null-embeddings were fitted for deterministic DDIM; drop --sampler / --eta", code=2)
        if unconditional:
            fail("--null-embeddings guide towards a class; drop --unconditional", code=2)
        clip_x0 = False if clip_x0 is None else clip_x0
    with user_errors():
        from ddim_cli import distributed

        shard, where = distributed.setup(device.value)  # one process, or one of torchrun's
        main = shard.main
        files = [("--out", out), ("--npz", npz), ("--save-latents", save_latents)]
        check_outputs(files, [("--out-dir", out_dir)], inputs=[checkpoint, latents, null_embeddings])
        loaded = load_run(checkpoint, ema, device, where)
        if out is None:
            check_outputs(directories=[("the default --out folder", loaded.run_dir / "samples")])
        spec = sampler_spec(loaded, sampler, steps, eta, skip, variance, clip_x0)
        shape = loaded.image_shape
        given = None if latents is None else load_latents(latents, shape)
        if given is not None and null_embeddings is None:
            seed, classes, unconditional = _recorded_draws(latents, seed, classes, unconditional, main)
        first_seed = loaded.config.sample.seed if seed is None else seed
        if given is not None and n is not None and n != len(given):
            raise ValueError(f"--n {n} does not match the {len(given)} latents in {latents}")
        count = len(given) if given is not None else (loaded.config.sample.n if n is None else n)
        steps_run = len(spec.timesteps(loaded.alpha_bars))
        name = f"sample-{spec.method}-S{spec.steps}" + (f"-eta{spec.eta:g}" if spec.method == "ddim" else "")
        grid = out or loaded.run_dir / "samples" / f"{name}-seed{first_seed}.png"
        if null_embeddings is not None:
            fitted, null_labels, w = _null_text_inputs(loaded, spec, null_embeddings, count, classes, guidance)
        else:
            w = labels_and_guidance(loaded, seeded_noise(shape, [first_seed])[1], classes, unconditional, guidance)[1]
        phi = rescale_or_config(loaded, guidance_rescale) if w and null_embeddings is None else 0.0
        settings = _sample_settings(
            loaded, spec, first_seed, count, classes, unconditional, (w, phi), latents, ema, precision
        )
        outputs = SampleFiles(
            grid,
            out_dir,
            npz,
            save_latents,
            count,
            shape,
            settings=settings,
            resume=resume and null_embeddings is None,  # --null-embeddings: a few images, made at once
            enabled=main,
            draws={"seed": first_seed, "classes": classes, "unconditional": unconditional},
        )
        done = shard.broadcast(outputs.done)
        if done and main:
            typer.echo(f"note: continuing an interrupted run: {done} of {count} images are done", err=True)
        label_batches, seconds = [], 0.0
        with outputs, progress_bar(count * steps_run, progress and main, spec.label) as bar:
            if null_embeddings is not None:
                start = perf_counter()
                images = g.sample_null_text(
                    loaded,
                    given,
                    null_labels,
                    fitted,
                    spec,
                    guidance=w,
                    batch_size=batch_size,
                    progress=rank_progress(bar, shard),
                    shard=shard,
                )
                seconds = perf_counter() - start
                outputs.add(0, given, images)
                label_batches.append(null_labels)
            else:  # batch by batch, so that no output holds every image in memory
                make_eps = command_noise_model(loaded, w, guidance_rescale, precision, compile_model)
                bar.update(done * steps_run)
                for first in range(0, count, batch_size):
                    seeds = list(range(first_seed + first, first_seed + min(count, first + batch_size)))
                    # Each seed's first draw is its x_T (or the given latent instead); its class and noise follow.
                    x_T, generators = seeded_noise(shape, seeds)
                    if given is not None:
                        x_T = given[first : first + len(seeds)]
                    labels = labels_and_guidance(loaded, generators, classes, unconditional, guidance, first)[0]
                    label_batches.append(labels)
                    ready = max(0, min(done - first, len(seeds)))  # made by the interrupted run
                    if ready:
                        outputs.skip(first, x_T[:ready])
                    if ready == len(seeds):
                        continue
                    new = slice(ready, None)
                    images, per_image = g.generate(
                        loaded,
                        make_eps,
                        spec,
                        x_T[new],
                        generators[new],
                        labels=None if labels is None else labels[new],
                        batch_size=batch_size,
                        progress=rank_progress(bar, shard),
                        shard=shard,
                    )
                    seconds += per_image * len(images)
                    outputs.add(first + ready, x_T[new], images)
                    bar.n = (first + len(seeds)) * steps_run  # the other ranks' share too
                    bar.refresh()
        distributed.finish(shard)
    if not main:
        return
    if label_batches[0] is None:
        conditioning = " (null label)" if loaded.config.model.num_classes else ""
    else:
        rescaled = f", rescale {phi:g}" if phi else ""
        conditioning = f" (classes {class_summary(torch.cat(label_batches))}, guidance {w:g}{rescaled})"
    made = count - done
    timing = f" in {seconds / made:.4f} s/image" if made else ""
    typer.echo(f"{count} images with {spec.label}{conditioning} from {loaded.checkpoint}{timing}")
    typer.echo("wrote " + ", ".join(outputs.written))


def _recorded_draws(latents: Path, seed: int | None, classes: str | None, unconditional: bool, main: bool):
    """``(seed, classes, unconditional)``: what ``--save-latents`` recorded beside ``latents`` (the
    seed decides each image's class draw and sampler noise), unless --seed, --class or
    --unconditional say otherwise. Latents without a record (``ddim invert``'s) change nothing."""
    from ddim_cli.images import draws_path, load_draws

    record = load_draws(latents)
    if record is None:
        return seed, classes, unconditional
    taken = []
    if seed is None:
        seed = record["seed"]
        taken.append(f"seed {seed}")
    if classes is None and not unconditional:
        classes, unconditional = record.get("classes"), bool(record.get("unconditional"))
        taken += ["--unconditional"] if unconditional else [f"--class {classes}"] if classes else []
    if taken and main:
        typer.echo(f"note: {' and '.join(taken)} from {draws_path(latents)}, as the latents were sampled", err=True)
    return seed, classes, unconditional


def _null_text_inputs(loaded, spec, path: Path, count: int, classes: str | None, guidance: float | None):
    """The fitted embeddings of ``ddim invert --null-text``, checked against this run, with the
    labels (the file's, or --class cycled) and guidance (the file's, or --guidance) to use."""
    import torch

    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.generate import check_classes
    from ddim_cli.images import load_null_embeddings
    from ddim_cli.seeding import cycle_classes

    fitted, fitted_steps, labels, fitted_guidance = load_null_embeddings(path)
    wanted = spec.timesteps(loaded.alpha_bars)
    if not torch.equal(fitted_steps, wanted.cpu()):
        raise CheckpointError(
            f"{path} was fitted on {len(fitted_steps)} timesteps ({fitted_steps[0]}..{fitted_steps[-1]}), not the "
            f"{len(wanted)} of --steps {spec.steps} --skip {spec.skip}; pass the --steps and --skip given to invert"
        )
    if fitted.shape[1] != count:
        raise CheckpointError(f"{path} holds null embeddings for {fitted.shape[1]} images, the latents are {count}")
    if loaded.config.model.num_classes is None or fitted.shape[2] != loaded.model.temb_ch:
        raise CheckpointError(f"{path} was not fitted for this model (embedding size {fitted.shape[2]})")
    wanted_classes = parse_classes(classes)
    check_classes(loaded, wanted_classes or labels.tolist())
    if wanted_classes:
        labels = cycle_classes(wanted_classes, count)
    return fitted, labels, fitted_guidance if guidance is None else guidance


def _sample_settings(loaded, spec, seed, count, classes, unconditional, guidance, latents, ema, precision) -> dict:
    """What decides the images of a ``ddim sample`` run: a run may continue another only if these agree.
    ``guidance`` is (w, rescale phi)."""
    from dataclasses import asdict

    made = loaded.checkpoint.stat()
    return {
        "checkpoint": str(loaded.checkpoint.resolve()),
        "checkpoint_bytes": made.st_size,
        "checkpoint_mtime_ns": made.st_mtime_ns,
        "ema": ema,
        **asdict(spec),
        "seed": seed,
        "n": count,
        "classes": classes,
        "unconditional": unconditional,
        "guidance": guidance[0],
        "guidance_rescale": guidance[1],
        "latents": None if latents is None else str(latents.resolve()),
        "precision": precision.value,
    }
