"""ddim convert: import the published DDPM weights."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.errors import fail, user_errors
from ddim_cli.commands.options import OUTPUT_PANEL
from ddim_cli.commands.running import check_outputs


class Preset(str, Enum):
    cifar10 = "cifar10"
    celeba = "celeba"
    lsun_bedroom = "lsun-bedroom"
    lsun_church = "lsun-church"
    lsun_cat = "lsun-cat"


def convert(
    source: Annotated[
        Path,
        typer.Argument(
            help="Original DDPM weights (.ckpt/.pth/.safetensors state dict, as used by the DDIM code) "
            "or a diffusers UNet2DModel directory (config.json + weights, or a pipeline with unet/); "
            "a ddim export folder comes back as the model it was.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="The checkpoint to write (.safetensors).", show_default=False, rich_help_panel=OUTPUT_PANEL
        ),
    ],
    preset: Annotated[
        Preset | None,
        typer.Option("--preset", help="Architecture of an original-layout file (the DDIM code's configs)."),
    ] = None,
    config_path: Annotated[
        Path | None, typer.Option("--config", help="Or a YAML config giving that architecture and schedule.")
    ] = None,
) -> None:
    """Convert published DDPM weights into a ddim-cli checkpoint (no code is unpickled)."""
    from ddim_cli.config import ConfigError, load_config
    from ddim_cli.convert import ConversionError
    from ddim_cli.convert import convert as run_conversion

    with user_errors():
        check_outputs([("--out", out, ".safetensors")], inputs=[source])
    try:
        config = load_config(config_path) if config_path is not None else None
        written = run_conversion(source, out, preset=preset.value if preset else None, config=config)
    except ConfigError as error:
        fail(str(error), code=2)
    except ConversionError as error:
        fail(str(error))
    typer.echo(f"wrote {written}; sample it with: ddim sample {written}")
