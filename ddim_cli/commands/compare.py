"""ddim compare: the paper's DDPM-vs-DDIM experiment from the same noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.common import (
    check_outputs,
    command_noise_model,
    fail,
    fid_statistics,
    labels_and_guidance,
    load_run,
    number_list,
    parse_classes,
    progress_bar,
    rank_progress,
    save_fid_stats,
    user_errors,
)
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


def compare(
    checkpoint: CheckpointArg = None,
    steps: Annotated[
        str, typer.Option("--steps", help="Comma-separated DDIM step counts.", rich_help_panel=SAMPLER_PANEL)
    ] = "10,20,50,100",
    eta: Annotated[
        str, typer.Option("--eta", help="Comma-separated DDIM etas.", rich_help_panel=SAMPLER_PANEL)
    ] = "0,0.5,1",
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
    from ddim_cli.models import student_for_steps
    from ddim_cli.seeding import seeded_noise

    step_counts = number_list(steps, int, "--steps")
    etas = number_list(eta, float, "--eta")
    if fid and reference is None:
        fail("--fid needs --reference (a folder, an .npz of images or statistics, or cifar10/mnist)", code=2)
    with user_errors():
        from ddim_cli import distributed

        shard, where = distributed.setup(device.value)  # one process, or one of torchrun's
        check_outputs([("--save-stats", save_stats)], [("--out", out)], inputs=[checkpoint])
        loaded = load_run(checkpoint, ema, device, where)
        check_outputs(directories=[("--out", out or loaded.run_dir / "compare")])
        cfg = loaded.config
        teacher = None
        if cfg.distill is not None:  # the student's rows next to its teacher's, at the counts it serves
            teacher = load_run(Path(cfg.distill.teacher), ema, device, where)
            counts = c.student_step_counts(loaded, step_counts)
            specs, roles = c.teacher_and_student_specs(loaded, teacher, counts, dpm_solver=dpm_solver, clip_x0=clip_x0)
        else:
            specs = c.comparison_specs(
                step_counts,
                etas,
                skip=cfg.sample.skip if skip is None else skip,
                clip_x0=cfg.sample.clip_x0 if clip_x0 is None else clip_x0,
                ddpm_reference=cfg.diffusion.num_timesteps if ddpm_reference else None,
                dpm_solver=dpm_solver,
            )
        for spec in specs:
            spec.check(loaded.alpha_bars)
        # Checked on the first images; every row and batch draws its classes the same way.
        first_seed = cfg.sample.seed if seed is None else seed
        _, w = labels_and_guidance(
            loaded, seeded_noise(loaded.image_shape, [first_seed])[1], classes, unconditional, guidance
        )
        per_row = max(n, fid)
        total = per_row * sum(len(spec.timesteps(loaded.alpha_bars)) for spec in specs)
        size = job_size(per_row, total / per_row, batch_size, guided=bool(w))
        make_eps = command_noise_model(loaded, w, guidance_rescale, precision, compile_model, size, threads)
        models = None
        if teacher is not None:
            teacher_w = (
                0.0 if teacher.config.model.num_classes is None or unconditional else teacher.config.sample.guidance
            )
            teacher_eps = command_noise_model(
                teacher, teacher_w, guidance_rescale, precision, compile_model, size, threads
            )
            models = [
                ("teacher", teacher, teacher_eps)
                if role == "teacher"
                else (
                    "student",
                    student := student_for_steps(loaded, spec.steps),
                    command_noise_model(student, 0.0, None, precision, compile_model, size, threads),
                )
                for spec, role in zip(specs, roles, strict=True)
            ]
        directory = out or loaded.run_dir / "compare"
        samples_dir = directory / "samples" if fid else None
        extract = _reference = None
        if fid:
            from ddim_cli import fid as f

            with shard.main_first():  # one download of the reference or the weights
                opened_reference = f.open_source(reference, batch_size, data_root=data_root, download=download)
                extract = f.inception_extractor(inception_weights, where)
            _reference = fid_statistics(
                f, opened_reference, extract, progress and shard.main, "reference statistics", shard
            )
            if shard.main:
                save_fid_stats(f, _reference, save_stats)
        with progress_bar(total, progress and shard.main, f"compare {len(specs)} samplers") as bar:
            rows = c.run_comparison(
                loaded,
                make_eps,
                specs,
                n=n,
                seed=first_seed,
                batch_size=batch_size,
                progress=rank_progress(bar, shard),
                samples_dir=samples_dir,
                count=fid or None,
                classes=parse_classes(classes),
                unconditional=unconditional,
                shard=shard,
                models=models,
            )
        if fid:
            with progress_bar(fid * len(rows), progress and shard.main, "sample statistics", unit="img") as bar:
                c.add_fid(
                    rows, samples_dir, _reference, extract, batch_size, cfg.name, shard, rank_progress(bar, shard)
                )
        distributed.finish(shard)
        if not shard.main:  # rank 0 writes
            return
        paths = c.write_comparison(rows, directory)
    typer.echo(paths["table.md"].read_text(), nl=False)
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
