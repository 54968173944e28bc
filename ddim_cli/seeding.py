"""Per-image randomness, after NVlabs/edm's generator: image ``i`` owns a CPU generator seeded with
``seed + i``, and draws from it, in order, its ``x_T``, then (for a class-conditional model) its
class, then any sampler noise. An image is therefore the same whatever the batch size, the number
of images or the device, and changing only the class of an image keeps its noise.
"""

from __future__ import annotations

import hashlib

import torch


def seeded_noise(shape: tuple[int, ...], seeds: list[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T for each seed (first draw of its own CPU generator) and the generators to continue with."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def draw_classes(generators: list[torch.Generator], num_classes: int) -> torch.Tensor:
    """One class per image, uniform over ``0 .. num_classes - 1``, from that image's generator."""
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in generators])


def cycle_classes(classes: list[int], count: int, first_index: int = 0) -> torch.Tensor:
    """``classes`` repeated over ``count`` images numbered from ``first_index``: image ``i`` gets
    ``classes[i % len(classes)]`` (so a batch starting at ``first_index`` continues the cycle)."""
    return torch.tensor([classes[i % len(classes)] for i in range(first_index, first_index + count)], dtype=torch.long)


def side_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator for randomness that is not an image's own, e.g. the noise that degrades input
    ``i`` in ``ddim restore --degrade`` (``key = (DEGRADE, i)``): seeded from ``(seed, *key)`` mixed
    by numpy's SeedSequence, so that it shares no stream with the images' ``seed + i``. (An offset
    would not do: torch keeps only the low 32 bits of a seed, so ``seed + 2**32`` is ``seed``.)"""
    import numpy as np

    words = [value % (1 << 64) for value in (seed, *key)]  # SeedSequence takes non-negative integers
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0]
    return torch.Generator().manual_seed(int(state))


def derived_seed(seed: int, step: int, rank: int, purpose: str) -> int:
    """The seed of one random draw of a training run: its ``purpose`` at step ``step`` on rank ``rank``
    (the whole RNG state of a run is its seed and its step)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative 63-bit integer
