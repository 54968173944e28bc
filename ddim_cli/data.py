"""Training datasets: images as float tensors in [-1, 1] of shape (C, H, W), with integer labels.

``digits`` (offline: scikit-learn's 1797 handwritten 8x8 digits, upscaled), ``cifar10`` and
``mnist`` (torchvision; downloaded only when ``data.download`` is true) and ``folder`` (any
directory of images, searched recursively; labels from first-level sub-folders when every image
sits in one).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ddim_cli.config import DataConfig

NO_LABEL = -1


class DataError(RuntimeError):
    """A dataset problem, described in one line."""


class ImageDataset(Dataset):
    """``dataset[i] -> (image, label)``; ``label`` is ``NO_LABEL`` when the data has no classes."""

    num_classes: int | None = None


def resize_mode(config: DataConfig) -> str:
    """``data.interpolation`` resolved: ``auto`` is bilinear for digits and bicubic otherwise."""
    if config.interpolation != "auto":
        return config.interpolation
    return "bilinear" if config.dataset == "digits" else "bicubic"


def build_dataset(config: DataConfig) -> ImageDataset:
    builders = {"digits": DigitsDataset, "cifar10": _torchvision_dataset, "mnist": _torchvision_dataset}
    dataset = FolderDataset(config) if config.dataset == "folder" else builders[config.dataset](config)
    if len(dataset) == 0:
        raise DataError(f"the {config.dataset} dataset at {config.root} has no images")
    return dataset


def as_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (Pillow's I;16 modes: 16-bit PNG and TIFF) scaled to 8 bits, v / 257 rounded;
    Pillow's own ``convert("L")`` or ``("RGB")`` clips it at 255 and turns almost every pixel white.
    Other modes are returned as they are."""
    if not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image).astype(np.float64)  # 0 .. 65535 whatever the byte order
    return Image.fromarray(np.rint(values / 257).astype(np.uint8), mode="L")


def image_transform(image_size: int, channels: int, mode: str = "bicubic") -> ImageTransform:
    """PIL image -> tensor in [-1, 1]: convert mode, resize the short side (``mode``: nearest,
    bilinear or bicubic), center-crop."""
    return ImageTransform(image_size, channels, mode)


class ImageTransform:
    """torchvision's ``Compose([Resize(size, mode), CenterCrop(size), ToTensor(), Normalize(0.5,
    0.5)])`` on a PIL image converted to L or RGB, computed as torchvision computes it (Pillow's
    resize, its crop offsets, x / 255 then (x - 0.5) / 0.5: the same floats, a test holds them
    equal) without importing torchvision, which costs a command 1.6 s (it loads torch._dynamo).
    Picklable, for DataLoader workers."""

    FILTERS = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }

    def __init__(self, image_size: int, channels: int, mode: str = "bicubic"):
        self.size, self.channels, self.resample = image_size, channels, self.FILTERS[mode]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = as_8bit(image).convert("L" if self.channels == 1 else "RGB")
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)  # the short side becomes ``size``, the long one truncates
        new_width, new_height = (self.size, new_long) if width <= height else (new_long, self.size)
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), self.resample)
        top, left = int(round((new_height - self.size) / 2.0)), int(round((new_width - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).view(self.size, self.size, self.channels)
        return pixels.permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255).sub(0.5).div(0.5)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``load_digits`` returns them: images (1797, 8, 8), values 0..16, and
    labels (1797,). Read from the table that ships in scikit-learn's package, which is what
    ``load_digits`` reads, without importing scikit-learn: its import is 1.2 s of every ``ddim
    train`` start (0.2 s this way). ``load_digits`` itself where the table is not found."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    roots = spec.submodule_search_locations if spec is not None else None
    for root in roots or []:
        table_file = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if table_file.is_file():
            table = np.loadtxt(table_file, delimiter=",")  # 64 pixel columns, then the label
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


class DigitsDataset(ImageDataset):
    """scikit-learn's ``load_digits``: 1797 real 8x8 handwritten digits, values 0..16, labels 0..9.

    They ship inside the package, so this needs no network. Images are upscaled to ``image_size``
    (``data.interpolation``; ``auto`` is bilinear) and held in memory. Nearest-neighbour upscaling by
    a whole factor is lossless: averaging each block gives back the 8x8 digit exactly, whereas
    bilinear x2 then 2x2 averaging blurs it by ``[1/8, 3/4, 1/8]`` along each axis.
    """

    num_classes = 10

    def __init__(self, config: DataConfig):
        digit_images, digit_labels = load_digits_arrays()
        images = torch.tensor(digit_images, dtype=torch.float32).unsqueeze(1) / 16.0
        mode = resize_mode(config)
        corners = {} if mode == "nearest" else {"align_corners": False}
        images = F.interpolate(images, size=(config.image_size,) * 2, mode=mode, **corners)
        self.images = (images.clamp(0, 1) * 2 - 1).repeat(1, config.channels, 1, 1)
        self.labels = torch.tensor(digit_labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class _TorchvisionDataset(ImageDataset):
    num_classes = 10

    def __init__(self, base: Dataset, transform: ImageTransform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), int(label)


def _torchvision_dataset(config: DataConfig) -> ImageDataset:
    from torchvision import datasets

    cls, title = {"cifar10": (datasets.CIFAR10, "CIFAR-10"), "mnist": (datasets.MNIST, "MNIST")}[config.dataset]
    try:
        base = cls(config.root, train=True, download=config.download)
    except RuntimeError as error:
        if config.download:
            raise DataError(f"could not download {title} into {config.root}: {error}") from None
        raise DataError(
            f"{title} was not found in {config.root!r}; set data.download: true (or --set data.download=true) "
            f"to download it there, or point data.root at a folder that holds it"
        ) from None
    return _TorchvisionDataset(base, image_transform(config.image_size, config.channels, resize_mode(config)))


class FolderDataset(ImageDataset):
    """Every readable image below ``config.root``, resized and center-cropped.

    Unreadable or non-image files are skipped with one warning that names them, or are an error
    when ``data.strict`` is true. If every image lies in a first-level sub-folder, the sorted
    sub-folder names are the classes.
    """

    def __init__(self, config: DataConfig):
        root = Path(config.root)
        if not root.is_dir():
            raise DataError(f"data.root {str(root)!r} is not a directory")
        paths, unreadable = [], []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
            try:
                with Image.open(path) as image:
                    image.verify()
                paths.append(path)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                if config.strict:
                    raise DataError(f"cannot read image {path} (data.strict is true)") from None
                unreadable.append(path)
        if unreadable:
            names = ", ".join(str(p) for p in unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
            warnings.warn(f"skipped {len(unreadable)} unreadable file(s): {names}", stacklevel=2)
        self.paths = paths
        self.transform = image_transform(config.image_size, config.channels, resize_mode(config))
        folders = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths]
        if paths and all(folders):
            classes = sorted(set(folders))
            self.num_classes = len(classes)
            self.labels = [classes.index(f) for f in folders]
        else:
            self.labels = [NO_LABEL] * len(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            with Image.open(self.paths[index]) as image:
                return self.transform(image), self.labels[index]
        except OSError as error:
            raise DataError(f"cannot read image {self.paths[index]}: {error}") from None
