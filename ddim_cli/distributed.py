"""Processes launched by torchrun: training splits each batch, generation splits the images.

Generation gives image ``i`` to rank ``i % world``: its seed, class and noise are still ``seed +
i``'s (:mod:`ddim_cli.seeding`), so the images are those of one process, whatever the number of
processes; rank 0 gathers each batch in index order and alone writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str) -> tuple[int, int, torch.device]:
    """``(rank, world, device)``: under torchrun (``WORLD_SIZE`` > 1) this process joins the group
    (NCCL on CUDA, gloo on CPU) and takes the GPU of its ``LOCAL_RANK``; otherwise ``(0, 1, device)``.
    ``device``: auto, cpu or cuda (a ValueError when CUDA is asked for but absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    if world == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def gather_in_order(positions: list[int], images: torch.Tensor, count: int, world: int) -> torch.Tensor | None:
    """Each rank's ``images`` (CPU) at ``positions`` of a batch of ``count``, assembled in order on
    rank 0 (None elsewhere). One process: the images as they are."""
    if world == 1:
        return images
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object((positions, images.cpu()), parts, dst=0)
    if parts is None:
        return None
    batch = torch.empty((count, *images.shape[1:]), dtype=images.dtype)
    for where, part in parts:
        batch[where] = part
    return batch


def finish(world: int) -> None:
    """Leave the process group (all ranks), after the last collective."""
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
