"""ddim export: a diffusers pipeline of a checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.errors import user_errors
from ddim_cli.commands.options import OUTPUT_PANEL, CheckpointArg, Device, EmaOpt
from ddim_cli.commands.running import check_outputs, load_run


class ExportFormat(str, Enum):
    diffusers = "diffusers"


def export(
    checkpoint: CheckpointArg = None,
    out: Annotated[
        Path, typer.Option("--out", help="The folder to write.", show_default=False, rich_help_panel=OUTPUT_PANEL)
    ] = ...,
    export_format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="diffusers: a save_pretrained layout (unet/, scheduler/, README.md with the sampling loop, "
            "and model_index.json where DDIMPipeline.from_pretrained can run it), plus ddim-cli.yaml, with which "
            "ddim convert gives back this very model.",
        ),
    ] = ExportFormat.diffusers,
    ema: EmaOpt = True,
) -> None:
    """Export a checkpoint for other tools (diffusers: UNet2DModel + DDIMScheduler, or LCMScheduler for a
    consistency or DMD student)."""
    from ddim_cli.export import export_diffusers

    with user_errors():
        check_outputs(directories=[("--out", out)], inputs=[checkpoint])
        loaded = load_run(checkpoint, ema, Device.cpu)
        written = export_diffusers(loaded.config, loaded.model.state_dict(), out)
    if Path(out) / "model_index.json" in written:
        how = f"load it with DDIMPipeline.from_pretrained({str(out)!r})"
    elif loaded.config.model.patch_size > 1:
        how = f"sample it as {out}/README.md shows (a patched model: unshuffle x_T, shuffle the result)"
    else:
        how = f"sample it as {out}/README.md shows (no diffusers pipeline steps an LCMScheduler over a UNet2DModel)"
    typer.echo(
        f"exported {loaded.checkpoint} ({'EMA' if ema else 'raw'} weights) to {out}/ ({len(written)} files, "
        f"checked by loading them with diffusers); {how}"
    )
