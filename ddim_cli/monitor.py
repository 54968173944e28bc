"""What a training run shows about itself: EMA sample grids, FID against the training set, and
``metrics.png`` (every metric of ``metrics.jsonl`` against steps).

EMA samples are drawn as ``ddim sample`` draws them by default: image ``i`` from seed
``sample.seed + i``, its class (for a class-conditional model) from that seed too, guided by
``sample.guidance``, with the run's ``sample`` settings.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ddim_cli.config import Config
from ddim_cli.fid import FeatureExtractor, FIDError, frechet_distance, load_statistics, save_statistics, statistics
from ddim_cli.guidance import classifier_free_guidance
from ddim_cli.images import save_grid, to_uint8
from ddim_cli.sampling import sample
from ddim_cli.schedule import SPACINGS, timesteps
from ddim_cli.seeding import draw_classes, seeded_noise

FID_BATCH = 250


@torch.no_grad()
def sample_ema(
    ema: torch.nn.Module,
    config: Config,
    ab: torch.Tensor,
    seeds: list[int],
    device: torch.device,
    batch_size: int = FID_BATCH,
) -> torch.Tensor:
    """Samples of ``ema`` (in [-1, 1], on the CPU) for the given seeds, as ``ddim sample`` makes them."""
    s = config.sample
    shape = (config.data.channels, config.data.image_size, config.data.image_size)
    x_T, generators = seeded_noise(shape, seeds)
    num_classes = config.model.num_classes
    labels = draw_classes(generators, num_classes) if num_classes else None
    steps = timesteps(config.diffusion.num_timesteps, s.steps if s.skip in SPACINGS else None, s.skip, ab)
    images = []
    for first in range(0, len(seeds), batch_size):
        chunk = slice(first, first + batch_size)
        eps_model = ema
        if labels is not None:
            eps_model = classifier_free_guidance(
                ema, labels[chunk].to(device), s.guidance, null_label=num_classes, rescale=s.guidance_rescale
            )
        batch = sample(
            eps_model,
            x_T[chunk].to(device),
            ab,
            steps,
            method="ddim" if config.distill is None else config.distill.sampler,  # a student samples as it learned
            eta=s.eta,
            clip_x0=s.clip_x0,
            prediction=config.model.prediction,
            generator=generators[chunk],
        )
        images.append(batch.float().cpu())
    return torch.cat(images)


def save_sample_grid(ema: torch.nn.Module, config: Config, ab: torch.Tensor, path: Path, device) -> None:
    """``sample.n`` EMA samples from the same seeds every time, to watch progress."""
    n = config.sample.n
    images = sample_ema(ema, config, ab, list(range(config.sample.seed, config.sample.seed + n)), device)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, path)  # about square


class TrainingFID:
    """FID of ``train.fid_samples`` EMA samples against the training set.

    The training set's statistics are computed once and cached in the run directory
    (``fid-reference-<features>.npz``). ``extractor`` defaults to torch-fidelity's Inception; if
    its weights cannot be had, one warning is issued and :meth:`measure` returns None from then on.
    """

    def __init__(
        self,
        run_dir: Path,
        dataset,
        config: Config,
        extractor: FeatureExtractor | None = None,
        features_name: str = "inception",
        device: torch.device | str = "cpu",
    ):
        self.run_dir, self.dataset, self.config = run_dir, dataset, config
        self.extractor, self.features_name, self.device = extractor, features_name, device
        self.reference: dict[str, np.ndarray] | None = None
        self.unavailable = False

    def _prepare(self) -> bool:
        if self.unavailable:
            return False
        if self.extractor is None:
            from ddim_cli.fid import inception_extractor

            try:
                self.extractor = inception_extractor(device=self.device)
            except FIDError as error:
                self.unavailable = True
                warnings.warn(f"train.fid_every: FID is skipped for this run: {error}", stacklevel=2)
                return False
        if self.reference is None:
            cache = self.run_dir / f"fid-reference-{self.features_name}.npz"
            self.reference = _cached_statistics(cache)
            if self.reference is None:
                self.reference = statistics(self._training_batches(), self.extractor)
                save_statistics(self.reference, cache)
        return True

    def _training_batches(self):
        for first in range(0, len(self.dataset), FID_BATCH):
            images = [self.dataset[i][0] for i in range(first, min(first + FID_BATCH, len(self.dataset)))]
            yield to_uint8(torch.stack(images))

    def measure(self, ema: torch.nn.Module, ab: torch.Tensor, device: torch.device) -> float | None:
        if not self._prepare():
            return None
        seeds = list(range(self.config.sample.seed, self.config.sample.seed + self.config.train.fid_samples))
        images = sample_ema(ema, self.config, ab, seeds, device)
        batches = (to_uint8(images[i : i + FID_BATCH]) for i in range(0, len(images), FID_BATCH))
        return frechet_distance(statistics(batches, self.extractor), self.reference)


def _cached_statistics(cache: Path) -> dict[str, np.ndarray] | None:
    """The run's cached FID reference statistics; None when missing or unreadable (a run must not
    stop for a damaged cache: the statistics are computed again and the cache rewritten)."""
    if not cache.exists():
        return None
    try:
        return load_statistics(cache)
    except FIDError as error:
        warnings.warn(f"{error}; computing the FID reference statistics again", stacklevel=2)
        return None


def read_metrics(metrics_file: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, without any line that is not a whole JSON record
    with a step: a kill or a full disk can cut the last one short, and the run must still resume."""
    records = []
    for line in metrics_file.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def plot_metrics(
    metrics_file: Path, out: Path, skip: Callable[[str], bool] = lambda key: key == "images_per_s"
) -> None:
    """One panel per metric in ``metrics_file`` (JSON lines with a ``step``) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if k != "step" and not skip(k)]
    if not keys:
        return
    columns = min(2, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3 * rows), dpi=100, squeeze=False)
    for axis, key in zip(axes.flat, keys, strict=False):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        if not points:
            continue
        axis.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, markersize=3)
        if key in ("loss", "grad_norm", "fid") and all(v > 0 for _, v in points):
            axis.set_yscale("log")
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(True, alpha=0.3)
    for axis in list(axes.flat)[len(keys) :]:
        axis.set_visible(False)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(out)


class TensorBoardLog:
    """``train.tensorboard: true``: the metrics of ``metrics.jsonl`` as scalars (``train/loss``,
    ``train/lr``, ``train/grad_norm``, ``train/images_per_s``, ``eval/fid``) and the sample grids
    as images, in event files under ``RUN_DIR/tensorboard/`` (``tensorboard --logdir runs``).
    A resumed run drops the events logged after its checkpoint (``purge_step``)."""

    def __init__(self, directory: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{'eval' if name == 'fid' else 'train'}/{name}", value, step)

    def grid(self, step: int, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            self.writer.add_image("samples", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def tensorboard_missing() -> str | None:
    """Why ``train.tensorboard`` cannot work here, or None."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return "train.tensorboard needs the tensorboard package: pip install 'ddim-cli[tensorboard]' (or tensorboard)"
    return None
