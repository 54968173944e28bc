"""ddim edit: class-to-class edits of real images (DDIB or SDEdit)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ddim_cli.commands.errors import fail, user_errors
from ddim_cli.commands.options import (
    CLASSES_PANEL,
    BatchOpt,
    CheckpointAndImagesArg,
    Device,
    DeviceOpt,
    EmaOpt,
    GuidanceRescaleOpt,
    ProgressOpt,
    SampleGuidanceOpt,
    SkipOpt,
    StepsOpt,
    ThreadsOpt,
    npz_option,
    out_folder_option,
)
from ddim_cli.commands.progress import progress_bar, rank_progress
from ddim_cli.commands.running import check_outputs, checkpoint_and_images, job_on_ranks, load_inputs, rescale_or_config


class EditMethod(str, Enum):
    ddib = "ddib"
    sdedit = "sdedit"


def edit(
    paths: CheckpointAndImagesArg,
    to_class: Annotated[
        int, typer.Option("--to-class", help="The class to turn every image into.", rich_help_panel=CLASSES_PANEL)
    ],
    from_class: Annotated[
        int | None,
        typer.Option(
            "--from-class",
            help="ddib: the class the images show (default: invert with the null label).",
            rich_help_panel=CLASSES_PANEL,
        ),
    ] = None,
    method: Annotated[
        EditMethod,
        typer.Option(
            "--method",
            help="ddib: invert under the source, decode under the target (Su et al. 2022); sdedit: noise to "
            "--strength x T and denoise under the target (Meng et al. 2021).",
        ),
    ] = EditMethod.ddib,
    strength: Annotated[
        float | None,
        typer.Option("--strength", help="sdedit: how far to noise, in (0, 1]; 1 is a fresh sample (default: 0.6)."),
    ] = None,
    guidance: SampleGuidanceOpt = None,
    guidance_rescale: GuidanceRescaleOpt = None,
    steps: StepsOpt = None,
    skip: SkipOpt = None,
    exact_inversion: Annotated[
        bool | None,
        typer.Option("--exact/--no-exact", help="ddib: exact (fixed-point) inversion of the source (default: exact)."),
    ] = None,
    null_text: Annotated[
        bool,
        typer.Option(
            "--null-text",
            help="ddib: null-text inversion under --from-class at --guidance, decoding with its null embeddings.",
        ),
    ] = False,
    seed: Annotated[
        int | None, typer.Option("--seed", help="sdedit: image i is noised with seed + i (default: 0).")
    ] = None,
    out: out_folder_option("edit") = None,
    npz: npz_option("the edits, in input order") = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = Device.auto,
    threads: ThreadsOpt = None,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
) -> None:
    """Turn real images into another class of a class-conditional model.

    Writes grid.png (originals above edits), edited/NNNNNN.png per image and distances.csv (each
    edit's per-dimension MSE to its source on [-1, 1]). Guidance defaults to the config's
    sample.guidance. Under torchrun the ranks share every batch; rank 0 writes.
    """
    import torch

    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.jobs.edit import edit_images, write_edits
    from ddim_cli.models import check_classes
    from ddim_cli.sampler_choice import choose_sampler
    from ddim_cli.seeding import seeded_noise

    checkpoint, images_in = checkpoint_and_images(paths, "edit")
    _check_method_options(method, strength=strength, seed=seed, exact=exact_inversion, from_class=from_class)
    strength, seed, exact_inversion = 0.6 if strength is None else strength, seed or 0, exact_inversion is not False
    if method == EditMethod.sdedit and not 0 < strength <= 1:
        fail(f"--strength must lie in (0, 1], got {strength:g}", code=2)
    if null_text and (method != EditMethod.ddib or from_class is None or guidance == 0):
        fail("--null-text needs --method ddib, --from-class J and --guidance W > 0", code=2)
    outputs = {"files": [("--npz", npz)], "directories": [("--out", out)], "inputs": [checkpoint, *images_in]}
    with job_on_ranks(device, checkpoint, ema, **outputs, full_model_for="ddim edit") as (shard, loaded):
        directory = out or loaded.run_dir / "edit"
        check_outputs(directories=[("--out", directory)])
        check_classes(loaded, [to_class], "--to-class")
        check_classes(loaded, None if from_class is None else [from_class], "--from-class")
        w = loaded.config.sample.guidance if guidance is None else guidance
        if null_text and not w:
            raise CheckpointError("--null-text needs --guidance W > 0 (this config's sample.guidance is 0)")
        originals = load_inputs(loaded, images_in)
        count, ddib = len(originals), method == EditMethod.ddib
        spec = choose_sampler(loaded, "ddim", steps, 0.0, skip, clip_x0=False if ddib else None)  # DDIB never clips
        to_labels = torch.full((count,), to_class, dtype=torch.long)
        from_labels = None if from_class is None else torch.full((count,), from_class, dtype=torch.long)
        with progress_bar(count, progress and shard.main, f"edit ({method.value}) S={spec.steps}") as bar:
            edited = edit_images(
                loaded,
                originals,
                spec,
                to_labels,
                from_labels=from_labels,
                method=method.value,
                guidance=w,
                guidance_rescale=rescale_or_config(loaded, guidance_rescale),
                strength=strength,
                noise=seeded_noise(loaded.image_shape, list(range(seed, seed + count)))[0],
                exact=exact_inversion,
                null_text=null_text,
                threads=threads,
                batch_size=batch_size,
                progress=rank_progress(bar, shard),
                shard=shard,
            )
    if not shard.main:  # rank 0 writes
        return
    with user_errors():
        names = [str(path) for path in images_in]
        distances, written = write_edits(directory, originals, edited, names, to_labels, from_labels, npz)
    how = method.value + (" + null-text" if null_text else " + exact inversion" if ddib and exact_inversion else "")
    typer.echo(
        f"edited {count} image(s) to class {to_class} with {how}, {spec.label}, guidance {w:g}"
        + (f", strength {strength:g}" if method == EditMethod.sdedit else "")
        + f"; mean MSE to source {sum(distances) / count:.4g}"
    )
    typer.echo("wrote " + ", ".join(written))


def _check_method_options(method: EditMethod, **given) -> None:
    """An option of the other method is a mistake to point out (sdedit has no inversion to make
    exact and no source class; DDIB draws no noise and has no strength), not a value to ignore."""
    names = {"strength": "--strength", "seed": "--seed", "exact": "--exact/--no-exact", "from_class": "--from-class"}
    sdedit_only = ("strength", "seed")
    wrong = [
        names[key]
        for key, value in given.items()
        if value is not None and (key in sdedit_only) != (method == EditMethod.sdedit)
    ]
    if wrong:
        other = "sdedit" if method == EditMethod.ddib else "ddib"
        fail(f"{' and '.join(wrong)} appl{'ies' if len(wrong) == 1 else 'y'} to --method {other} only", code=2)
