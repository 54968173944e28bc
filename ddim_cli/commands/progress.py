"""Progress bars (one per job on rank 0, counting the work of every rank) and FID statistics."""

from __future__ import annotations

import typer


def progress_bar(total: int | None, enabled: bool, desc: str, unit: str = "img-step"):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, desc=desc, dynamic_ncols=True)


def rank_progress(bar, shard):
    """This rank's progress counted for all ranks (they share the work evenly), up to the bar's total."""
    if bar.total is None:
        return lambda done: bar.update(done * shard.world)
    return lambda done: bar.update(min(done * shard.world, bar.total - bar.n))


def fid_statistics(f, opened, extract, progress: bool, desc: str, shard=None):
    """Statistics of a source opened with ``fid.open_source`` (a statistics file is used as it is),
    with a progress bar."""
    from ddim_cli.distributed import Shard

    if isinstance(opened, dict):
        return opened
    shard = shard or Shard()
    with progress_bar(None, progress, desc, unit="img") as bar:
        return f.statistics(opened, extract, progress=rank_progress(bar, shard), shard=shard)


def save_fid_stats(f, stats, path) -> None:
    """Write reference statistics where --save-stats asked (None: not asked)."""
    if path is not None:
        f.save_statistics(stats, path)
        typer.echo(f"wrote reference statistics to {path}", err=True)
