"""What ``ddim sample`` does (and ``compare`` and the evaluation scripts reuse): images from a loaded checkpoint.

Randomness follows EDM's per-seed convention (:mod:`ddim_cli.seeding`): image ``i`` gets its own
generator seeded with ``seed + i``; its x_T is the first draw, its class (for a class-conditional
model) the second, and any sampler noise the following ones. An image is therefore the same
whatever the batch size, the number of images or the device it is drawn on.

Each generating function takes an optional ``shard`` (:class:`ddim_cli.distributed.Shard`): under
torchrun each rank computes its images of every batch (image ``i`` on rank ``i % world``) and
every rank returns all of them, as one process would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ddim_cli.acceleration import Precision, Switch, job_size
from ddim_cli.batches import AllRanksProgress, in_batches, pick, step_counter
from ddim_cli.conditioning import class_summary
from ddim_cli.distributed import Shard
from ddim_cli.images import load_latents
from ddim_cli.models import LoadedModel, MakeEps, Progress, SamplerSpec, class_labels, noise_model
from ddim_cli.sample_files import SampleFiles
from ddim_cli.sampling import sample
from ddim_cli.seeding import seeded_noise


def generate(
    loaded: LoadedModel,
    make_eps: MakeEps,
    spec: SamplerSpec,
    x_T: torch.Tensor,
    generators: list[torch.Generator],
    *,
    labels: torch.Tensor | None = None,
    batch_size: int,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> tuple[torch.Tensor, float]:
    """Sample every x_T (image i with ``labels[i]``, or the null label) in batches; returns the
    images (CPU, [-1, 1]) and seconds per image."""
    ab = loaded.alpha_bars
    ts = spec.timesteps(ab)
    eta = spec.eta if spec.method == "ddim" else 0.0

    def run(index: list[int], batch: torch.Tensor) -> torch.Tensor:
        return sample(
            make_eps(pick(labels, index)),
            batch,
            ab,
            ts,
            method=spec.method,
            eta=eta,
            variance=spec.variance,
            clip_x0=spec.clip_x0,
            prediction=loaded.prediction,
            generator=[generators[i] for i in index],
            callback=step_counter(progress, len(batch)),
        )

    start = time.perf_counter()
    images = in_batches(loaded, x_T, batch_size, run, shard)
    return images, (time.perf_counter() - start) / len(x_T)


def slerp(z0: torch.Tensor, z1: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two latents (DDIM paper, Section 5.3 and Appendix D.5)."""
    a, b = z0.flatten().double(), z1.flatten().double()
    theta = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
    if theta < 1e-6:  # (nearly) parallel latents: plain linear interpolation
        frames = [(1 - w) * a + w * b for w in alphas.double()]
    else:
        frames = [
            (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta) for w in alphas.double()
        ]
    return torch.stack(frames).to(z0.dtype).view(len(alphas), *z0.shape)


@dataclass
class SampleRun:
    """What :func:`sample_to_files` did."""

    count: int  # images in the run
    resumed: int  # images an interrupted run had completed (not sampled again)
    seconds: float  # sampling time of the other images
    labels: torch.Tensor | None  # every image's class; None: the null label
    written: list[str]  # the files, as the command lists them
    guidance: float = 0.0  # the guidance w sampled with
    guidance_rescale: float = 0.0

    def describe(self, loaded: LoadedModel, spec: SamplerSpec) -> str:
        """One line: how many images, how, with which classes and guidance, from which checkpoint."""
        if self.labels is None:
            conditioning = " (null label)" if loaded.config.model.num_classes else ""
        else:
            rescaled = f", rescale {self.guidance_rescale:g}" if self.guidance_rescale else ""
            guided = f"guidance {self.guidance:g}{rescaled}"
            if loaded.config.distill is not None:
                guided = f"its teacher's guidance {loaded.config.distill.guidance:g}, learnt by distillation"
            conditioning = f" (classes {class_summary(self.labels)}, {guided})"
        made = self.count - self.resumed
        timing = f" in {self.seconds / made:.4f} s/image" if made else ""
        # a DMD student samples with the consistency chain: name the method so the label does not mislead
        student = f" of a {loaded.config.distill.method} student" if loaded.config.distill is not None else ""
        return f"{self.count} images with {spec.label}{student}{conditioning} from {loaded.checkpoint}{timing}"


def default_grid_path(loaded: LoadedModel, spec: SamplerSpec, seed: int) -> Path:
    """Where ``ddim sample`` writes its grid unless told: the run's samples/, named by sampler and seed."""
    name = f"sample-{spec.method}-S{spec.steps}" + (f"-eta{spec.eta:g}" if spec.method == "ddim" else "")
    return loaded.run_dir / "samples" / f"{name}-seed{seed}.png"


def sample_settings(
    loaded: LoadedModel,
    spec: SamplerSpec,
    *,
    seed: int,
    count: int,
    classes,
    unconditional: bool,
    guidance: float,
    guidance_rescale: float,
    latents: Path | None,
    precision: str,
) -> dict:
    """What decides the images of a sample run: an interrupted run may be continued only by one
    whose settings are equal (:mod:`ddim_cli.sample_files`)."""
    made = loaded.checkpoint.stat()
    return {
        "checkpoint": str(loaded.checkpoint.resolve()),
        "checkpoint_bytes": made.st_size,
        "checkpoint_mtime_ns": made.st_mtime_ns,
        "ema": loaded.ema,
        **asdict(spec),
        "seed": seed,
        "n": count,
        "classes": classes,
        "unconditional": unconditional,
        "guidance": guidance,
        "guidance_rescale": guidance_rescale,
        "latents": None if latents is None else str(Path(latents).resolve()),
        "precision": precision,
    }


def sample_to_files(
    loaded: LoadedModel,
    spec: SamplerSpec,
    grid: Path,
    *,
    count: int,
    seed: int = 0,
    out_dir: Path | None = None,
    npz: Path | None = None,
    save_latents: Path | None = None,
    latents: Path | None = None,
    classes: list[int] | None = None,
    unconditional: bool = False,
    guidance: float = 0.0,
    guidance_rescale: float = 0.0,
    precision: Precision = "auto",
    compile: Switch = "auto",
    threads: int | None = None,
    resume: bool = True,
    batch_size: int = 64,
    progress: Progress | None = None,
    notify: Callable[[str], None] | None = None,
    shard: Shard | None = None,
) -> SampleRun:
    """``ddim sample``: ``count`` images from seeds ``seed, seed + 1, ...`` (or from the x_T in
    ``latents``, a .npy), written as the grid and, if given, a PNG per image in ``out_dir``, the
    ``npz`` and the x_T used (``save_latents``, with the seed and classes beside it).

    Classes as :func:`~ddim_cli.models.class_labels` chooses them, guided with ``guidance`` (0 for
    the null label), on a CPU with ``threads`` threads (None: see
    :func:`~ddim_cli.models.noise_model`). Batch by batch, so no output holds every image in memory;
    with ``out_dir`` or ``npz`` an interrupted run continues where it stopped (``resume``). ``progress`` counts
    (image x step) units of all ranks; ``notify`` gets notes such as a continued run's.
    """
    shard = shard or Shard()
    shape = loaded.image_shape
    given = None if latents is None else load_latents(latents, shape)
    if given is not None and count != len(given):
        raise ValueError(f"--n {count} does not match the {len(given)} latents in {latents}")
    steps = len(spec.timesteps(loaded.alpha_bars))
    make_eps = noise_model(
        loaded,
        guidance=guidance,
        guidance_rescale=guidance_rescale,
        precision=precision,
        compile=compile,
        size=job_size(-(-count // shard.world), steps, batch_size, guided=bool(guidance)),
        threads=threads,
        notify=notify,
    )
    settings = sample_settings(
        loaded,
        spec,
        seed=seed,
        count=count,
        classes=classes,
        unconditional=unconditional,
        guidance=guidance,
        guidance_rescale=guidance_rescale,
        latents=latents,
        precision=precision,
    )
    draws = {"seed": seed, "classes": classes, "unconditional": unconditional}
    outputs = SampleFiles(
        grid,
        out_dir,
        npz,
        save_latents,
        count,
        shape,
        settings=settings,
        resume=resume,
        enabled=shard.main,
        draws=draws,
    )
    done = shard.broadcast(outputs.done)
    if done and notify is not None:
        notify(f"continuing an interrupted run: {done} of {count} images are done")
    report = AllRanksProgress(progress, shard, count * steps)
    report.advance_to(done * steps)
    label_batches, seconds = [], 0.0
    with outputs:
        for first in range(0, count, batch_size):
            seeds = list(range(seed + first, seed + min(count, first + batch_size)))
            # Each seed's first draw is its x_T (or the given latent instead); its class and noise follow.
            x_T, generators = seeded_noise(shape, seeds)
            if given is not None:
                x_T = given[first : first + len(seeds)]
            labels = class_labels(loaded, generators, classes=classes, unconditional=unconditional, first_index=first)
            label_batches.append(labels)
            ready = max(0, min(done - first, len(seeds)))  # made by the interrupted run
            if ready:
                outputs.skip(first, x_T[:ready])
            if ready < len(seeds):
                new = slice(ready, None)
                images, per_image = generate(
                    loaded,
                    make_eps,
                    spec,
                    x_T[new],
                    generators[new],
                    labels=None if labels is None else labels[new],
                    batch_size=batch_size,
                    progress=report,
                    shard=shard,
                )
                seconds += per_image * len(images)
                outputs.add(first + ready, x_T[new], images)
            report.advance_to((first + len(seeds)) * steps)
    labels = None if label_batches[0] is None else torch.cat(label_batches)
    return SampleRun(count, done, seconds, labels, outputs.written, guidance, guidance_rescale)
