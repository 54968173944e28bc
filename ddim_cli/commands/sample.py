"""ddim sample: images from a checkpoint with DDIM, DPM-Solver++ or DDPM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.errors import fail
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
    ThreadsOpt,
    UnconditionalOpt,
    Variance,
    npz_option,
)
from ddim_cli.commands.progress import progress_bar
from ddim_cli.commands.running import auto_switch, check_outputs, job_on_ranks, parse_classes, rescale_or_config


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
        typer.Option("--out", help="The grid, a .png (default: in the run's samples/).", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Also write each image as its own PNG here.", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    npz: npz_option("the images, for FID tools") = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="A run into --out-dir / --npz that was interrupted continues where it stopped when run again "
            "with the same options; --no-resume starts afresh.",
        ),
    ] = True,
    device: DeviceOpt = Device.auto,
    threads: ThreadsOpt = None,
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
    from ddim_cli.conditioning import sample_conditioning
    from ddim_cli.jobs.invert import null_text_sample_to_files
    from ddim_cli.jobs.sample import default_grid_path, sample_to_files
    from ddim_cli.sampler_choice import choose_sampler
    from ddim_cli.seeding import seeded_noise

    if null_embeddings is not None:
        _check_null_text_options(latents, sampler, eta, unconditional)
        clip_x0 = False if clip_x0 is None else clip_x0
    files = [("--out", out, ".png"), ("--npz", npz), ("--save-latents", save_latents)]
    outputs = {
        "files": files,
        "directories": [("--out-dir", out_dir)],
        "inputs": [checkpoint, latents, null_embeddings],
    }
    with job_on_ranks(device, checkpoint, ema, steps=steps, **outputs) as (shard, loaded):
        if out is None:
            check_outputs(directories=[("the default --out folder", loaded.run_dir / "samples")])
        spec = choose_sampler(loaded, sampler.value, steps, eta, skip, variance.value, clip_x0)
        if latents is not None and null_embeddings is None:
            seed, classes, unconditional = _recorded_draws(latents, seed, classes, unconditional, shard.main)
        seed = loaded.config.sample.seed if seed is None else seed
        count = _count(loaded, latents, n)
        with progress_bar(count * len(spec.timesteps(loaded.alpha_bars)), progress and shard.main, spec.label) as bar:
            job = {"classes": parse_classes(classes), "batch_size": batch_size, "threads": threads, "shard": shard}
            job |= {"grid": out or default_grid_path(loaded, spec, seed), "out_dir": out_dir, "npz": npz}
            job |= {"save_latents": save_latents, "progress": bar.update}
            if null_embeddings is not None:
                run = null_text_sample_to_files(
                    loaded, spec, latents=latents, null_embeddings=null_embeddings, guidance=guidance, **job
                )
            else:  # the first image's draws check --class / --guidance before any work
                first = seeded_noise(loaded.image_shape, [seed])[1]
                w = sample_conditioning(loaded, first, job["classes"], unconditional, guidance)[1]
                run = sample_to_files(
                    loaded,
                    spec,
                    count=count,
                    seed=seed,
                    latents=latents,
                    unconditional=unconditional,
                    guidance=w,
                    guidance_rescale=rescale_or_config(loaded, guidance_rescale) if w else 0.0,
                    precision=precision.value,
                    compile=auto_switch(compile_model),
                    resume=resume,
                    notify=lambda note: typer.echo(f"note: {note}", err=True) if shard.main else None,
                    **job,
                )
    if shard.main:
        typer.echo(run.describe(loaded, spec))
        typer.echo("wrote " + ", ".join(run.written))


def _check_null_text_options(latents: Path | None, sampler: Sampler, eta: float | None, unconditional: bool) -> None:
    if latents is None:
        fail("--null-embeddings needs --latents (both written by ddim invert --null-text)", code=2)
    if sampler != Sampler.ddim or eta:
        fail("--null-embeddings were fitted for deterministic DDIM; drop --sampler / --eta", code=2)
    if unconditional:
        fail("--null-embeddings guide towards a class; drop --unconditional", code=2)


def _count(loaded, latents: Path | None, n: int | None) -> int:
    """How many images: --n, else every latent given, else the config's sample.n."""
    if latents is None:
        return loaded.config.sample.n if n is None else n
    from ddim_cli.images import load_latents

    given = len(load_latents(latents, loaded.image_shape))
    if n is not None and n != given:
        raise ValueError(f"--n {n} does not match the {given} latents in {latents}")
    return given


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
        recorded = record.get("classes")  # a list (older records: the option's text)
        classes = ",".join(map(str, recorded)) if isinstance(recorded, list) else recorded
        unconditional = bool(record.get("unconditional"))
        taken += ["--unconditional"] if unconditional else [f"--class {classes}"] if classes else []
    if taken and main:
        typer.echo(f"note: {' and '.join(taken)} from {draws_path(latents)}, as the latents were sampled", err=True)
    return seed, classes, unconditional
