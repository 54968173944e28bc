"""Fréchet Inception Distance with torch-fidelity's TensorFlow-compatible InceptionV3.

torch-fidelity ports the InceptionV3 graph of the original TF FID code (TTUR, used by DDPM and
DDIM for their tables), including its bilinear resize to 299x299, so its FID numbers are
comparable to the papers'. Its statistics (float64 mean and covariance of the 2048-d pool
features) and its Fréchet distance are used as they are.

The feature extractor is a plain callable ``uint8 (N, 3, H, W) -> (N, D) features``, so tests plug
in a small one; the Inception weights are downloaded by torch-fidelity on first real use into
torch's usual cache (``~/.cache/torch/hub/checkpoints``), or read from ``--inception-weights``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ddim_cli.checkpoint import UNPICKLE_ERRORS, load_tensors_only, unpickle_reason
from ddim_cli.data import as_8bit
from ddim_cli.distributed import Shard
from ddim_cli.outputs import written_whole

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
Statistics = dict[str, np.ndarray]
DATASETS = ("cifar10", "mnist")


class FIDError(RuntimeError):
    """An FID input problem, described in one line."""


def inception_extractor(weights: Path | None = None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """torch-fidelity's ``inception-v3-compat`` 2048-d features (TF FID's pool3 layer)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as URL_INCEPTION
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if weights is not None:
        if not Path(weights).is_file():
            raise FIDError(f"Inception weights {weights} do not exist")
        try:  # torch-fidelity unpickles the file itself; accept only files that hold tensors alone
            load_tensors_only(weights)
        except UNPICKLE_ERRORS as error:
            raise FIDError(f"{weights} is not an Inception state dict of tensors: {unpickle_reason(error)}") from None
    try:
        model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=None if weights is None else str(weights)
        ).to(device)
    except (OSError, RuntimeError) as error:  # no network (URLError is an OSError), a broken download
        raise FIDError(
            f"could not get the Inception weights ({str(error).splitlines()[0]}); download {URL_INCEPTION} "
            "once and pass it with --inception-weights PATH"
        ) from None

    def extract(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(images.to(device))[0].double().cpu()

    return extract


def statistics(
    batches: Iterator[np.ndarray], extract: FeatureExtractor, progress=None, shard: Shard | None = None
) -> Statistics:
    """Mean and covariance of the features of uint8 (N, H, W, C) batches (grayscale -> RGB). With a
    ``shard`` (torchrun) batch ``b`` is extracted by rank ``b % world`` and every rank gets the
    statistics of all of them, the same as one process computes."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    shard = shard or Shard()

    def features_of(batch: np.ndarray) -> torch.Tensor:
        images = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        features = extract(images)
        if progress is not None:
            progress(len(batch))
        return features

    stacked = shard.map_batches(batches, features_of)
    if len(stacked) < 2:
        raise FIDError("FID needs at least 2 images" if len(stacked) else "no images to compute statistics of")
    stats = fid_features_to_statistics(stacked)
    return {"mu": stats["mu"], "sigma": stats["sigma"], "count": np.array(len(stacked))}


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (torch-fidelity's implementation)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a["mu"].shape != b["mu"].shape:
        raise FIDError(f"feature sizes differ: {a['mu'].shape[0]} and {b['mu'].shape[0]}")
    pair = [{"mu": s["mu"].astype(np.float64), "sigma": s["sigma"].astype(np.float64)} for s in (a, b)]
    return float(fid_statistics_to_metric(pair[0], pair[1], False)[KEY_METRIC_FID])


def save_statistics(stats: Statistics, path: Path) -> None:
    with written_whole(path) as partial, open(partial, "wb") as handle:
        np.savez(handle, mu=stats["mu"], sigma=stats["sigma"], count=stats.get("count", np.array(-1)))


def load_statistics(path: Path) -> Statistics | None:
    """The statistics in ``path`` if it is a statistics ``.npz`` (keys mu, sigma), else None."""
    stats = _read_npz(path, ("mu", "sigma"), optional=("count",))
    if stats is None:
        return None
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{path}: mu must be (D,) and sigma (D, D), finite; got {mu.shape} and {sigma.shape}")
    return stats


def _read_npz(path: Path, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
    """The arrays ``keys`` (and those of ``optional`` present) of the ``.npz`` at ``path``, never
    unpickled; None when it lacks one of ``keys``. A file that is no readable .npz: one FIDError."""
    if not zipfile.is_zipfile(path):  # np.load would read a .npy as one array, anything else as a pickle
        raise FIDError(f"{path} is not an .npz archive (np.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not all(key in archive.files for key in keys):
                return None
            return {key: archive[key] for key in (*keys, *optional) if key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # object arrays, a damaged archive
        raise FIDError(f"cannot read {path}: {error}") from None


def source_batches(source: str | Path, batch_size: int, *, data_root: Path | None = None, download: bool = False):
    """uint8 (N, H, W, C) batches from a folder of images, an ``.npz`` (``arr_0``) or a dataset name."""
    if str(source) in DATASETS:
        return _dataset_batches(str(source), batch_size, data_root or Path("data") / str(source), download)
    path = Path(source)
    if path.is_dir():
        return _folder_batches(path, batch_size)
    if path.suffix == ".npz" and path.is_file():
        arrays = _read_npz(path, ("arr_0",))
        if arrays is None:
            raise FIDError(f"{path} has neither arr_0 (images) nor mu/sigma (statistics)")
        images = arrays["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise FIDError(
                f"{path}: arr_0 must be uint8 (N, H, W, C) with C = 1 or 3, got {images.dtype} {images.shape}"
            )
        return (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    raise FIDError(f"{source} is not a folder of images, an .npz file or one of {', '.join(DATASETS)}")


def _folder_batches(folder: Path, batch_size: int) -> Iterator[np.ndarray]:
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not paths:
        raise FIDError(f"{folder} holds no images ({', '.join(sorted(suffixes))})")

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                return np.asarray(as_8bit(image).convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise FIDError(f"cannot read image {path}: {error}") from None

    first_shape = read(paths[0]).shape

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            arrays = [read(p) for p in chunk]
            for path, array in zip(chunk, arrays, strict=True):
                if array.shape != first_shape:
                    raise FIDError(f"{path} is {array.shape[1]}x{array.shape[0]}, unlike the first image {paths[0]}")
            yield np.stack(arrays)

    return batches()


def _dataset_batches(name: str, batch_size: int, root: Path, download: bool) -> Iterator[np.ndarray]:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "mnist": datasets.MNIST}[name]
    try:
        dataset = cls(str(root), train=True, download=download)
    except RuntimeError:
        raise FIDError(f"{name} was not found in {root}; pass --download to fetch it there, or --data-root") from None
    images = np.asarray(dataset.data)  # uint8 (N, H, W, 3) for CIFAR-10, (N, H, W) for MNIST
    if images.ndim == 3:
        images = images[..., None]
    return (images[i : i + batch_size] for i in range(0, len(images), batch_size))


def open_source(
    source: str | Path, batch_size: int, *, data_root: Path | None = None, download: bool = False
) -> Statistics | Iterator[np.ndarray]:
    """A statistics ``.npz`` as its statistics; anything else as checked, ready image batches."""
    path = Path(source)
    if path.suffix == ".npz" and path.is_file():
        stats = load_statistics(path)
        if stats is not None:
            return stats
    return source_batches(source, batch_size, data_root=data_root, download=download)


def reference_statistics(
    reference: str | Path, extract: FeatureExtractor, batch_size: int, *, data_root=None, download=False, progress=None
) -> Statistics:
    """Statistics of a reference: a statistics ``.npz`` as it is, anything else computed."""
    opened = open_source(reference, batch_size, data_root=data_root, download=download)
    return opened if isinstance(opened, dict) else statistics(opened, extract, progress)
