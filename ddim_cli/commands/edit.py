"""ddim edit: class-to-class edits of real images (DDIB or SDEdit)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ddim_cli.commands.common import (
    check_outputs,
    checkpoint_and_images,
    fail,
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
    CLASSES_PANEL,
    BatchOpt,
    CheckpointAndImagesArg,
    Device,
    DeviceOpt,
    EmaOpt,
    GuidanceRescaleOpt,
    ProgressOpt,
    SampleGuidanceOpt,
    Sampler,
    SkipOpt,
    StepsOpt,
    ThreadsOpt,
    Variance,
    npz_option,
    out_folder_option,
)


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
        float, typer.Option("--strength", help="sdedit: how far to noise, in (0, 1]; 1 is a fresh sample.")
    ] = 0.6,
    guidance: SampleGuidanceOpt = None,
    guidance_rescale: GuidanceRescaleOpt = None,
    steps: StepsOpt = None,
    skip: SkipOpt = None,
    exact_inversion: Annotated[
        bool, typer.Option("--exact/--no-exact", help="ddib: exact (fixed-point) inversion of the source.")
    ] = True,
    null_text: Annotated[
        bool,
        typer.Option(
            "--null-text",
            help="ddib: null-text inversion under --from-class at --guidance, decoding with its null embeddings.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="sdedit: image i is noised with seed + i.")] = 0,
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

    from ddim_cli import distributed
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.jobs.edit import edit_images, write_edits
    from ddim_cli.seeding import seeded_noise

    checkpoint, images_in = checkpoint_and_images(paths, "edit")
    if method == EditMethod.sdedit and not 0 < strength <= 1:
        fail(f"--strength must lie in (0, 1], got {strength:g}", code=2)
    if null_text and (method != EditMethod.ddib or from_class is None or guidance == 0):
        fail("--null-text needs --method ddib, --from-class J and --guidance W > 0", code=2)
    with user_errors():
        shard, where = distributed.setup(device.value)  # one process, or one of torchrun's
        check_outputs([("--npz", npz)], [("--out", out)], inputs=[checkpoint, *images_in])
        loaded = load_run(checkpoint, ema, device, where)
        refuse_students(loaded, "ddim edit")
        directory = out or loaded.run_dir / "edit"
        check_outputs(directories=[("--out", directory)])
        if loaded.config.model.num_classes is None:
            raise CheckpointError("--to-class needs a class-conditional model; this one is unconditional")
        num_classes = loaded.config.model.num_classes
        for option, label in (("--to-class", to_class), ("--from-class", from_class)):
            if label is not None and not 0 <= label < num_classes:
                raise CheckpointError(f"{option} {label} is out of range; this model has classes 0..{num_classes - 1}")
        w = loaded.config.sample.guidance if guidance is None else guidance
        if null_text and not w:
            raise CheckpointError("--null-text needs --guidance W > 0 (this config's sample.guidance is 0)")
        originals = load_inputs(loaded, images_in)
        count = len(originals)
        ddib_spec = method == EditMethod.ddib
        spec = sampler_spec(loaded, Sampler.ddim, steps, 0.0, skip, Variance.posterior, False if ddib_spec else None)
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
        distributed.finish(shard)
        if not shard.main:  # rank 0 writes
            return
        names = [str(path) for path in images_in]
        distances, written = write_edits(directory, originals, edited, names, to_labels, from_labels, npz)
    how = method.value + (
        " + null-text" if null_text else " + exact inversion" if ddib_spec and exact_inversion else ""
    )
    typer.echo(
        f"edited {count} image(s) to class {to_class} with {how}, {spec.label}, guidance {w:g}"
        + (f", strength {strength:g}" if method == EditMethod.sdedit else "")
        + f"; mean MSE to source {sum(distances) / count:.4g}"
    )
    typer.echo("wrote " + ", ".join(written))
