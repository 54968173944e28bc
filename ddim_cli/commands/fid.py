"""ddim fid: Frechet Inception Distance between samples and a reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddim_cli.commands.errors import fail, user_errors
from ddim_cli.commands.options import (
    BatchOpt,
    DataRootOpt,
    Device,
    DeviceOpt,
    DownloadOpt,
    InceptionOpt,
    ProgressOpt,
    SaveStatsOpt,
)
from ddim_cli.commands.progress import fid_statistics, save_fid_stats
from ddim_cli.commands.running import check_outputs, torch_device


def fid_command(
    samples: Annotated[str, typer.Argument(help="A folder of images or an .npz (arr_0 = uint8 (N, H, W, C)).")],
    reference: Annotated[
        str,
        typer.Argument(help="A folder, an .npz of images or of statistics (mu, sigma), or cifar10 / mnist (train)."),
    ],
    save_stats: SaveStatsOpt = None,
    inception_weights: InceptionOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchOpt = 100,
    device: DeviceOpt = Device.auto,
    progress: ProgressOpt = True,
) -> None:
    """Frechet Inception Distance between samples and a reference (torch-fidelity, TF-compatible)."""
    from ddim_cli import fid as f

    with user_errors():
        check_outputs([("--save-stats", save_stats)], inputs=[Path(samples), Path(reference)])
    try:  # both inputs are checked before the Inception weights are fetched
        opened_samples = f.open_source(samples, batch_size)
        opened_reference = f.open_source(reference, batch_size, data_root=data_root, download=download)
        extract = f.inception_extractor(inception_weights, torch_device(device))
        reference_stats = fid_statistics(f, opened_reference, extract, progress, "reference statistics")
        save_fid_stats(f, reference_stats, save_stats)
        sample_stats = fid_statistics(f, opened_samples, extract, progress, "sample statistics")
        value = f.frechet_distance(sample_stats, reference_stats)
    except f.FIDError as error:
        fail(str(error))
    typer.echo(f"FID {value:.4f} ({int(sample_stats['count'])} samples vs {reference})")
