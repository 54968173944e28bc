"""ddim compare: the paper's DDPM-vs-DDIM experiment from the same noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.errors import fail, user_errors
from ddim_cli.commands.options import (
    SAMPLER_PANEL,
    BatchOpt,
    CheckpointArg,
    ClassesOpt,
    ClipOpt,
    CompileOpt,
    DataRootOpt,
    Device,
    DeviceOpt,
    DownloadOpt,
    EmaOpt,
    GuidanceRescaleOpt,
    InceptionOpt,
    Precision,
    PrecisionOpt,
    ProgressOpt,
    ReferenceOpt,
    SampleGuidanceOpt,
    SaveStatsOpt,
    SeedOpt,
    SkipOpt,
    ThreadsOpt,
    UnconditionalOpt,
    out_folder_option,
)
from ddim_cli.commands.progress import fid_statistics, progress_bar, rank_progress, save_fid_stats
from ddim_cli.commands.running import (
    auto_switch,
    check_outputs,
    job_on_ranks,
    load_run,
    number_list,
    parse_classes,
    rescale_or_config,
)


def compare(
    checkpoint: CheckpointArg = None,
    steps: Annotated[
        str, typer.Option("--steps", help="Comma-separated DDIM step counts.", rich_help_panel=SAMPLER_PANEL)
    ] = "10,20,50,100",
    eta: Annotated[
        str | None,
        typer.Option("--eta", help="Comma-separated DDIM etas (default: 0,0.5,1).", rich_help_panel=SAMPLER_PANEL),
    ] = None,
    skip: SkipOpt = None,
    ddpm_reference: Annotated[
        bool,
        typer.Option(
            "--ddpm-reference/--no-ddpm-reference",
            help="Add DDPM over all T steps as a reference row.",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = True,
    dpm_solver: Annotated[
        bool,
        typer.Option(
            "--dpm-solver/--no-dpm-solver",
            help="Add DPM-Solver++(2M) rows (logsnr spacing) per step count.",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = True,
    clip_x0: ClipOpt = None,
    classes: ClassesOpt = None,
    unconditional: UnconditionalOpt = False,
    guidance: SampleGuidanceOpt = None,
    guidance_rescale: GuidanceRescaleOpt = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Images per row.")] = 8,
    seed: SeedOpt = None,
    batch_size: BatchOpt = 64,
    out: out_folder_option("compare") = None,
    fid: Annotated[
        int,
        typer.Option("--fid", min=0, help="Also compute FID from N samples per row (kept and reused in OUT/samples)."),
    ] = 0,
    reference: ReferenceOpt = None,
    inception_weights: InceptionOpt = None,
    save_stats: SaveStatsOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    device: DeviceOpt = Device.auto,
    threads: ThreadsOpt = None,
    precision: PrecisionOpt = Precision.auto,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
    compile_model: CompileOpt = None,
) -> None:
    """Run DDIM at several steps and etas, and DDPM, from the same noise; write a grid, a table and plots.

    With --fid N --reference REF, every row also gets its FID over N samples, and, for the
    cifar10/celeba presets, the DDIM paper's Table 1 value beside it. Under torchrun
    (`torchrun --nproc_per_node N -m ddim_cli -- compare ...`) the ranks share every batch and
    the FID features; rank 0 writes.
    """
    from ddim_cli import compare as c
    from ddim_cli.acceleration import job_size
    from ddim_cli.conditioning import sample_conditioning
    from ddim_cli.models import noise_model
    from ddim_cli.seeding import seeded_noise

    step_counts = number_list(steps, int, "--steps")
    etas = None if eta is None else number_list(eta, float, "--eta")
    if fid and reference is None:
        fail("--fid needs --reference (a folder, an .npz of images or statistics, or cifar10/mnist)", code=2)
    outputs = {"files": [("--save-stats", save_stats)], "directories": [("--out", out)], "inputs": [checkpoint]}
    with job_on_ranks(device, checkpoint, ema, **outputs) as (shard, loaded):
        directory = out or loaded.run_dir / "compare"
        check_outputs(directories=[("--out", directory)])
        distilled = loaded.config.distill  # a student's rows next to its teacher's, at the counts it serves
        teacher = None if distilled is None else load_run(Path(distilled.teacher), ema, device, loaded.device)
        plan = {"skip": skip, "clip_x0": clip_x0, "ddpm_reference": ddpm_reference, "dpm_solver": dpm_solver}
        specs, roles = c.plan_comparison(loaded, step_counts, etas, teacher=teacher, **plan)
        # Checked on the first images; every row and batch draws its classes the same way.
        first_seed = loaded.config.sample.seed if seed is None else seed
        first = seeded_noise(loaded.image_shape, [first_seed])[1]
        w = sample_conditioning(loaded, first, parse_classes(classes), unconditional, guidance)[1]
        total = max(n, fid) * sum(len(spec.timesteps(loaded.alpha_bars)) for spec in specs)
        size = job_size(max(n, fid), total / max(n, fid), batch_size, guided=bool(w))

        def noise_model_of(model, guided_w: float):
            rescale = rescale_or_config(model, guidance_rescale)
            run_as = {"precision": precision.value, "compile": auto_switch(compile_model), "threads": threads}
            return noise_model(model, guidance=guided_w, guidance_rescale=rescale, size=size, **run_as)

        make_eps = noise_model_of(loaded, w)
        models = None if teacher is None else c.row_models(loaded, teacher, specs, roles, noise_model_of, unconditional)
        samples_dir = directory / "samples" if fid else None
        if fid:  # the reference first: a missing download fails before any sampling
            source = {"weights": inception_weights, "save_stats": save_stats, "root": data_root, "download": download}
            reference_stats, extract = _reference_statistics(
                reference, source, batch_size, progress, shard, loaded.device
            )
        with progress_bar(total, progress and shard.main, f"compare {len(specs)} samplers") as bar:
            draws = {"seed": first_seed, "classes": parse_classes(classes), "unconditional": unconditional}
            run = {"batch_size": batch_size, "samples_dir": samples_dir, "count": fid or None, "shard": shard}
            rows = c.run_comparison(
                loaded, make_eps, specs, n=n, models=models, progress=rank_progress(bar, shard), **draws, **run
            )
        if fid:
            with progress_bar(fid * len(rows), progress and shard.main, "sample statistics", unit="img") as bar:
                progress_of = rank_progress(bar, shard)
                c.add_fid(
                    rows, samples_dir, reference_stats, extract, batch_size, loaded.config.name, shard, progress_of
                )
    if shard.main:  # rank 0 writes
        with user_errors():
            paths = c.write_comparison(rows, directory)
        typer.echo(paths["table.md"].read_text(), nl=False)
        typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def _reference_statistics(reference, source: dict, batch_size: int, progress: bool, shard, device):
    """The FID reference's statistics and the feature extractor (one download, on rank 0 first);
    rank 0 saves the statistics where --save-stats asks."""
    from ddim_cli import fid as f

    with shard.main_first():
        opened = f.open_source(reference, batch_size, data_root=source["root"], download=source["download"])
        extract = f.inception_extractor(source["weights"], device)
    stats = fid_statistics(f, opened, extract, progress and shard.main, "reference statistics", shard)
    if shard.main:
        save_fid_stats(f, stats, source["save_stats"])
    return stats, extract
