"""The batches a training or distillation run draws, step by step.

Step ``k``'s global batch is a slice of epoch ``k // steps_per_epoch``'s permutation, drawn from
:func:`~ddim_cli.seeding.derived_seed` ``(train.seed, epoch)``; rank ``r`` of ``world`` takes
its ``r``-th share. Two ways deliver those same images:

- **on the device** (``data.on_device``): the whole dataset decoded once and held on the training
  device, as uint8 where that is lossless (every image that torchvision's ``ToTensor`` made from
  8-bit pixels: CIFAR-10's 50,000 images are 150 MB), each batch gathered there by index. No
  worker processes, no host-to-device copy and no host sync in the step (the speedrun recipe).
- **a DataLoader** with ``data.num_workers`` processes, for datasets too large to hold.

Both give bit-identical batches (tests/test_data.py checks it on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from ddim_cli.config import Config
from ddim_cli.errors import TrainingError
from ddim_cli.seeding import derived_seed
from ddim_cli.stopping import ignore_stop_signals

# ``data.on_device: auto`` holds a dataset whose decoded images take at most this much (and, on
# CUDA, at most a quarter of the free GPU memory).
ON_DEVICE_LIMIT_BYTES = 2 * 1024**3


def data_batches(dataset, config: Config, start: int, rank: int, world: int, device: torch.device) -> Iterator:
    """This rank's ``(images, labels)`` of each global batch from step ``start`` on, on ``device``."""
    if config.model.num_classes is not None and dataset.num_classes is None:
        # Checked once here: a dataset's labels are all known or all absent (data.py).
        raise TrainingError("a class-conditional model needs labelled data")
    if holds_on_device(dataset, config, device):
        held = DeviceImages.decode(dataset, config.data.num_workers, device)
        return _on_device_batches(held, config, start, rank, world)
    return _loader_batches(dataset, config, start, rank, world, device)


def holds_on_device(dataset, config: Config, device: torch.device) -> bool:
    """``data.on_device`` resolved: ``auto`` when the images fit (see :data:`ON_DEVICE_LIMIT_BYTES`)."""
    choice = config.data.on_device
    if choice != "auto":
        return bool(choice)
    size = len(dataset) * config.data.channels * config.data.image_size**2  # bytes as uint8
    if device.type == "cuda":
        return size <= min(ON_DEVICE_LIMIT_BYTES, torch.cuda.mem_get_info(device)[0] // 4)
    return size <= ON_DEVICE_LIMIT_BYTES


def epoch_order(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(derived_seed(seed, epoch, 0, "order")))


def _step_indices(dataset_size: int, config: Config, start: int, rank: int, world: int, device: torch.device):
    """This rank's indices into the dataset for each step from ``start``, on ``device``: its slice
    of the step's epoch order (copied there once per epoch); the last partial batch of an epoch
    is dropped."""
    batch = config.train.batch_size
    steps_per_epoch, local = dataset_size // batch, batch // world
    order, order_epoch, step = None, None, start
    while True:
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(dataset_size, config.train.seed, epoch).to(device), epoch
        first = position * batch + rank * local
        yield order[first : first + local]
        step += 1


def _loader_batches(dataset, config: Config, start: int, rank: int, world: int, device: torch.device) -> Iterator:
    indices = _step_indices(len(dataset), config, start, rank, world, torch.device("cpu"))
    loader = DataLoader(
        dataset,
        batch_sampler=(part.tolist() for part in indices),
        num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=config.data.num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )
    for images, labels in loader:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _on_device_batches(data: DeviceImages, config: Config, start: int, rank: int, world: int) -> Iterator:
    for indices in _step_indices(len(data), config, start, rank, world, data.device):
        yield data.batch(indices)


class DeviceImages:
    """A dataset decoded once and held on one device: uint8 pixels where the images are
    ``ToTensor`` output of 8-bit pixels (decoded again exactly as ``ToTensor`` and ``Normalize``
    compute it), else the float images themselves."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def decode(cls, dataset, num_workers: int, device: torch.device) -> DeviceImages:
        loader = DataLoader(dataset, batch_size=256, num_workers=num_workers, worker_init_fn=ignore_stop_signals)
        floats, codes, labels, lossless = [], [], [], True
        for images, batch_labels in loader:
            labels.append(batch_labels)
            if lossless:
                code = (images * 0.5 + 0.5).mul(255).round().clamp(0, 255).to(torch.uint8)
                lossless = torch.equal(_pixels_to_float(code), images)
                codes.append(code)
            floats.append(images)
        images = torch.cat(codes) if lossless else torch.cat(floats)
        return cls(images.to(device), torch.cat(labels).to(device))

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[indices]
        return (_pixels_to_float(images) if images.dtype == torch.uint8 else images), self.labels[indices]


def _pixels_to_float(pixels: torch.Tensor) -> torch.Tensor:
    # torchvision's ToTensor (x / 255) then Normalize(0.5, 0.5) ((x - 0.5) / 0.5), op for op, so
    # the floats are bit-identical to the DataLoader's.
    return pixels.to(torch.float32).div(255).sub(0.5).div(0.5)
