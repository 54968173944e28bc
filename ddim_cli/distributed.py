"""Processes launched by torchrun: training splits each batch, generation splits the images.

Generation gives image ``i`` to rank ``i % world``: its seed, class and noise are still ``seed +
i``'s (:mod:`ddim_cli.seeding`), so the images are those of one process, whatever the number of
processes. A :class:`Shard` says which rank this process is; the library's generation functions
take one, run their share of every batch and gather the batch in index order, and the command
line lets rank 0 alone write files and show progress.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

# torch.distributed.nn.functional binds ``group.WORLD`` as its functions' default argument when
# first imported, which importing torch._dynamo does (torchvision, torch.compile and the first
# torch.optim optimizer import it). Imported after setup() made the group, it would hold the group
# past destroy_process_group, and gloo's threads would run on into interpreter shutdown, where a
# rank aborted now and then ("terminate called without an active exception"). Imported here,
# before any group exists, its defaults hold None (where torch was built with distributed support).
if dist.is_available():
    import torch.distributed.nn  # noqa: F401

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes (``rank`` 0 writes the outputs);
    ``owns_group``: :func:`setup` joined the process group, so :func:`finish` leaves it (a group
    the caller made is the caller's)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def positions(self, first: int, count: int) -> list[int]:
        """The positions, within a batch of images ``first .. first + count - 1``, of this rank's images."""
        return [p for p in range(count) if (first + p) % self.world == self.rank]

    def batches(self, total: int, batch_size: int) -> Iterator[tuple[list[int], list[int], int]]:
        """For each batch of ``total`` images: this rank's ``(positions, image numbers, batch size)``."""
        for first in range(0, total, batch_size):
            count = min(batch_size, total - first)
            positions = self.positions(first, count)
            yield positions, [first + p for p in positions], count

    def gather(self, positions: list[int], values: torch.Tensor | None, count: int) -> torch.Tensor:
        """Every rank's ``values`` (rows at its ``positions``; None where it has none) assembled in
        order into ``count`` rows, on every rank. One process: ``values`` as they are."""
        if self.world == 1:
            return values
        parts = [None] * self.world
        dist.all_gather_object(parts, (positions, None if values is None else values.cpu()))
        filled = [part for where, part in parts if where]
        batch = torch.empty((count, *filled[0].shape[1:]), dtype=filled[0].dtype)
        for where, part in parts:
            if where:
                batch[where] = part
        return batch

    def map_batches(self, batches: Iterator[T], work: Callable[[T], torch.Tensor]) -> torch.Tensor:
        """``work`` on batch ``b`` of ``batches`` by rank ``b % world`` (whole batches, so each one is
        computed as one process computes it), concatenated in order on every rank."""
        mine = [(b, work(batch)) for b, batch in enumerate(batches) if b % self.world == self.rank]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, [(b, result.cpu()) for b, result in mine])
            mine = sorted((item for part in parts for item in part), key=_first)
        return torch.cat([result for _, result in mine]) if mine else torch.empty(0)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block before the others do (e.g. one download into a shared cache)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def _first(item: tuple) -> int:
    return item[0]


def setup(device: str) -> tuple[Shard, torch.device]:
    """``(shard, device)``: under torchrun (``WORLD_SIZE`` > 1) this process joins the group
    (NCCL on CUDA, gloo on CPU) and takes the GPU of its ``LOCAL_RANK``; otherwise one process.
    ``device``: auto, cpu or cuda (a ValueError when CUDA is asked for but absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    if world == 1:
        return Shard(), torch.device("cuda" if use_cuda else "cpu")
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    shard = Shard(dist.get_rank(), dist.get_world_size(), owns_group)
    return shard, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def finish(shard: Shard) -> None:
    """Every rank past its last collective (a barrier); then a group :func:`setup` joined is left,
    with a warning if anything still holds it: its backend's threads would run on into interpreter
    shutdown, where they can abort the rank (see :func:`setup`). The two-rank tests fail on the
    warning."""
    if shard.world == 1 or not dist.is_initialized():
        return
    dist.barrier()
    if not shard.owns_group:
        return
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    if group() is not None:
        warnings.warn(
            "the process group outlived destroy_process_group (something still holds it); "
            "its threads may abort this process at exit",
            RuntimeWarning,
            stacklevel=2,
        )
