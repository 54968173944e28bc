"""Running a job over its images in batches, on one process or split over torchrun's ranks."""

from __future__ import annotations

import torch

from ddim_cli.distributed import Shard
from ddim_cli.models import LoadedModel, Progress


def pick(labels: torch.Tensor | None, index: list[int]) -> torch.Tensor | None:
    return None if labels is None else labels[index]


def in_batches(
    loaded: LoadedModel, inputs: torch.Tensor, batch_size: int, run, shard: Shard | None = None
) -> torch.Tensor:
    """``run(index, batch)`` over ``inputs`` in batches (``index``: the batch's image numbers), on
    the CPU. With a ``shard`` this rank runs its images of each batch and every rank gets them all."""
    device = next(loaded.model.parameters()).device
    shard = shard or Shard()
    outputs = []
    for positions, index, count in shard.batches(len(inputs), batch_size):
        mine = run(index, inputs[index].to(device)).cpu() if index else None
        outputs.append(shard.gather(positions, mine, count))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(outputs)


def step_counter(progress: Progress | None, batch: int):
    return None if progress is None else (lambda i, t, x, x0: progress(batch))


class AllRanksProgress:
    """``progress`` fed with this rank's units counted for all ranks (they share each batch evenly),
    never past ``total``; :meth:`advance_to` settles the count at a known point."""

    def __init__(self, progress: Progress | None, shard: Shard, total: int):
        self.progress, self.world, self.total, self.reported = progress, shard.world, total, 0

    def __call__(self, units: int) -> None:
        self.advance_to(self.reported + units * self.world)

    def advance_to(self, reported: int) -> None:
        step = min(reported, self.total) - self.reported
        if step > 0 and self.progress is not None:
            self.progress(step)
        self.reported += max(step, 0)
