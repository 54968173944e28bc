"""ddim edit: class-to-class edits of real images (DDIB or SDEdit)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
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
    rescale_or_config,
    sampler_spec,
    user_errors,
)
from ddim_cli.commands.options import (
    CLASSES_PANEL,
    OUTPUT_PANEL,
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
    Variance,
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
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: the run's edit/).", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    npz: Annotated[
        Path | None,
        typer.Option(
            "--npz",
            help="Also write arr_0 = uint8 (N, H, W, C) of the edits, in input order.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = Device.auto,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
) -> None:
    """Turn real images into another class of a class-conditional model.

    Writes grid.png (originals above edits), edited/NNNNNN.png per image and distances.csv (each
    edit's per-dimension MSE to its source on [-1, 1]). Guidance defaults to the config's
    sample.guidance. Under torchrun the ranks share every batch; rank 0 writes.
    """
    from ddim_cli import generate as g
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.images import save_grid, save_npz, save_pngs, to_uint8
    from ddim_cli.seeding import seeded_noise

    checkpoint, images_in = checkpoint_and_images(paths, "edit")
    if method == EditMethod.sdedit and not 0 < strength <= 1:
        fail(f"--strength must lie in (0, 1], got {strength:g}", code=2)
    if null_text and (method != EditMethod.ddib or from_class is None or guidance == 0):
        fail("--null-text needs --method ddib, --from-class J and --guidance W > 0", code=2)
    with user_errors():
        import torch

        from ddim_cli import distributed

        shard, where = distributed.setup(device.value)  # one process, or one of torchrun's
        check_outputs([("--npz", npz)], [("--out", out)], inputs=[checkpoint, *images_in])
        loaded = load_run(checkpoint, ema, device, where)
        check_outputs(directories=[("--out", out or loaded.run_dir / "edit")])
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
        noise = seeded_noise(loaded.image_shape, list(range(seed, seed + count)))[0]
        with progress_bar(count, progress and shard.main, f"edit ({method.value}) S={spec.steps}") as bar:
            edited = g.edit_images(
                loaded,
                originals,
                spec,
                torch.full((count,), to_class, dtype=torch.long),
                from_labels=None if from_class is None else torch.full((count,), from_class, dtype=torch.long),
                method=method.value,
                guidance=w,
                guidance_rescale=rescale_or_config(loaded, guidance_rescale),
                strength=strength,
                noise=noise,
                exact=exact_inversion,
                null_text=null_text,
                batch_size=batch_size,
                progress=rank_progress(bar, shard),
                shard=shard,
            )
        distributed.finish(shard)
        if not shard.main:  # rank 0 writes
            return
        distances = (edited.clamp(-1, 1) - originals).pow(2).flatten(1).mean(1).tolist()
        directory = out or loaded.run_dir / "edit"
        save_grid(torch.cat([originals, edited.clamp(-1, 1)]), directory / "grid.png", nrow=count)
        save_pngs(edited, directory / "edited")
        source = "null" if from_class is None else from_class
        lines = ["image,from_class,to_class,mse_to_source"] + [
            f"{p},{source},{to_class},{d:.6g}" for p, d in zip(images_in, distances, strict=True)
        ]
        (directory / "distances.csv").write_text("\n".join(lines) + "\n")
        written = [f"{directory}/ (grid.png, edited/, distances.csv)"]
        if npz is not None:
            save_npz(to_uint8(edited), npz)
            written.append(str(npz))
    how = method.value + (
        " + null-text" if null_text else " + exact inversion" if ddib_spec and exact_inversion else ""
    )
    typer.echo(
        f"edited {count} image(s) to class {to_class} with {how}, {spec.label}, guidance {w:g}"
        + (f", strength {strength:g}" if method == EditMethod.sdedit else "")
        + f"; mean MSE to source {sum(distances) / count:.4g}"
    )
    typer.echo("wrote " + ", ".join(written))
