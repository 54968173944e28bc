"""What ``ddim invert`` does: deterministic DDIM inversion (plain, exact or null-text) of real
images to latents, their reconstruction, and the files the command writes."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ddim_cli.acceleration import Precision, Switch, job_size
from ddim_cli.batches import AllRanksProgress, in_batches, pick, step_counter
from ddim_cli.checkpoint import CheckpointError
from ddim_cli.distributed import Shard
from ddim_cli.images import load_latents, load_null_embeddings, save_grid, save_latents, save_null_embeddings
from ddim_cli.inversion_defaults import EXACT_TOL, NULL_TEXT_INNER_STEPS
from ddim_cli.jobs.sample import SampleRun, generate, slerp
from ddim_cli.models import LoadedModel, MakeEps, Progress, SamplerSpec, check_classes, noise_model, use_cpu_threads
from ddim_cli.null_text import NullTextInversion, null_text_guidance, null_text_inversion
from ddim_cli.outputs import write_text_whole
from ddim_cli.sample_files import SampleFiles
from ddim_cli.sampling import ExactInversionReport, invert, sample
from ddim_cli.seeding import cycle_classes


def invert_images(
    loaded: LoadedModel,
    make_eps: MakeEps,
    images: torch.Tensor,
    spec: SamplerSpec,
    *,
    labels: torch.Tensor | None = None,
    batch_size: int,
    exact: bool = False,
    max_iter: int = 10,
    tol: float = EXACT_TOL,
    report: list[ExactInversionReport] | None = None,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion of images in [-1, 1] to latents at the first sampling timestep;
    ``exact`` solves each step by fixed-point iteration (:func:`ddim_cli.sampling.invert`), and
    ``report`` collects each batch's steps."""
    ab = loaded.alpha_bars
    ts = spec.timesteps(ab)

    def run(index: list[int], batch: torch.Tensor) -> torch.Tensor:
        return invert(
            make_eps(pick(labels, index)),
            batch,
            ab,
            ts,
            prediction=loaded.prediction,
            exact=exact,
            max_iter=max_iter,
            tol=tol,
            report=report,
            callback=step_counter(progress, len(batch)),
        )

    return in_batches(loaded, images, batch_size, run, shard)


def embedding_model(loaded: LoadedModel):
    """``(model(x, t, e), embed(labels), null_vector)`` of a class-conditional checkpoint: the U-Net
    conditioned on label embeddings, for null-text inversion (fp32, eager, gradients allowed)."""
    unet = loaded.model
    if loaded.config.model.num_classes is None:
        raise CheckpointError("null-text inversion needs a class-conditional model; this one is unconditional")

    def model(x: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return unet(x, t, label_embedding=embedding)

    def embed(labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return unet.label_emb(labels.to(unet.label_emb.weight.device))

    return model, embed, unet.label_emb.weight[loaded.config.model.num_classes].detach()


def invert_null_text(
    loaded: LoadedModel,
    images: torch.Tensor,
    spec: SamplerSpec,
    labels: torch.Tensor,
    *,
    guidance: float,
    batch_size: int,
    exact: bool = False,
    max_iter: int = 10,
    tol: float = EXACT_TOL,
    inner_steps: int = NULL_TEXT_INNER_STEPS,
    lr: float = 0.1,
    early_stop: float = 1e-5,
    report: list[ExactInversionReport] | None = None,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> NullTextInversion:
    """:func:`ddim_cli.null_text.null_text_inversion` of images in [-1, 1] (one class each), in
    batches; the result's tensors are on the CPU."""
    model, embed, null = embedding_model(loaded)
    ab, ts = loaded.alpha_bars, spec.timesteps(loaded.alpha_bars)
    device = null.device
    shard = shard or Shard()
    gathered = []
    for positions, index, count in shard.batches(len(images), batch_size):
        fields = [None] * 4
        if index:
            mine = len(index)
            result = null_text_inversion(
                model,
                images[index].to(device),
                embed(labels[index]),
                null,
                ab,
                ts,
                guidance=guidance,
                prediction=loaded.prediction,
                exact=exact,
                max_iter=max_iter,
                tol=tol,
                inner_steps=inner_steps,
                lr=lr,
                early_stop=early_stop,
                report=report,
                progress=None if progress is None else (lambda done, mine=mine: progress(done * mine)),
            )
            # Image-major, to be gathered over the images: (N, ...) each.
            fields = [
                result.latent.cpu(),
                result.null_embeddings.transpose(0, 1).cpu(),
                result.reconstruction.cpu(),
                result.step_losses.transpose(0, 1).cpu(),
            ]
        gathered.append([shard.gather(positions, field, count) for field in fields])
    latent, null_embeddings, reconstruction, step_losses = (torch.cat(parts) for parts in zip(*gathered, strict=True))
    return NullTextInversion(latent, ts, null_embeddings.transpose(0, 1), reconstruction, step_losses.transpose(0, 1))


def sample_null_text(
    loaded: LoadedModel,
    latents: torch.Tensor,
    labels: torch.Tensor,
    null_embeddings: torch.Tensor,
    spec: SamplerSpec,
    *,
    guidance: float,
    batch_size: int,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Deterministic DDIM from ``latents`` with each step's fitted null embedding (S, N, D), guided
    towards ``labels``: the reconstruction of a null-text inversion, or an edit with other labels."""
    model, embed, _ = embedding_model(loaded)
    ab, ts = loaded.alpha_bars, spec.timesteps(loaded.alpha_bars)

    def run(index: list[int], batch: torch.Tensor) -> torch.Tensor:
        eps_model = null_text_guidance(
            model,
            embed(labels[index]),
            null_embeddings[:, index],
            ts,
            guidance,
        )
        return sample(
            eps_model, batch, ab, ts, prediction=loaded.prediction, callback=step_counter(progress, len(batch))
        )

    return in_batches(loaded, latents, batch_size, run, shard)


def reconstruction_metrics(originals: torch.Tensor, reconstructions: torch.Tensor) -> list[tuple[float, float]]:
    """Per-image (MSE per dimension on [-1, 1], as in the DDIM paper's Table 2; PSNR in dB on [0, 1])."""
    mse = (originals.float() - reconstructions.float()).pow(2).flatten(1).mean(1)
    # On [-1, 1] the peak-to-peak range is 2, so PSNR = 10 log10(2^2 / MSE).
    return [(float(m), 10 * math.log10(4 / float(m)) if m > 0 else math.inf) for m in mse]


@dataclass
class InversionRun:
    """What :func:`invert_to_folder` computed and wrote."""

    latents: torch.Tensor  # (N, C, H, W): x at the first sampling timestep
    reconstructions: torch.Tensor  # decoded from the latents (as the inversion was done)
    metrics: list[tuple[float, float]]  # per image: (MSE per dimension on [-1, 1], PSNR dB)
    report: list[ExactInversionReport]  # per image, with exact inversion
    null_text: NullTextInversion | None  # the fitted null embeddings, with null_text
    written: list[str]  # the files, in the folder


def invert_to_folder(
    loaded: LoadedModel,
    originals: torch.Tensor,
    names: Sequence[str],
    spec: SamplerSpec,
    directory: Path,
    *,
    labels: torch.Tensor | None = None,
    guidance: float = 0.0,
    guidance_rescale: float = 0.0,
    exact: bool = False,
    max_iter: int = 10,
    tol: float = EXACT_TOL,
    null_text: bool = False,
    inner_steps: int = NULL_TEXT_INNER_STEPS,
    lr: float = 0.1,
    early_stop: float = 1e-5,
    interpolate: int = 0,
    precision: Precision = "fp32",
    compile: Switch = "auto",
    threads: int | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> InversionRun:
    """``ddim invert``: invert ``originals`` (in [-1, 1], named ``names`` in metrics.csv) with
    deterministic DDIM (``exact``: fixed-point steps; ``null_text``: null-text inversion under
    ``labels`` at ``guidance``), decode the latents back, and write into ``directory``:
    latents.npy, grid.png (originals, reconstructions, latents), metrics.csv, with ``null_text``
    null_embeddings.safetensors, and with ``interpolate`` N > 0 (two images) interpolation.png,
    N frames decoded from latents slerped between the two."""
    if interpolate and len(originals) != 2:
        raise ValueError(f"--interpolate needs exactly two images, got {len(originals)}")
    # Calls per step and image: the inversion (about 5 with --exact), null-text's inner steps and
    # the decoding; an estimate for the compile decision.
    per_step = (5 if exact else 1) + (2 * inner_steps if null_text else 0) + 1
    calls = per_step * len(spec.timesteps(loaded.alpha_bars))
    size = job_size(len(originals), calls, batch_size, guided=bool(guidance))
    make_eps = noise_model(
        loaded,
        guidance=guidance,
        guidance_rescale=guidance_rescale,
        precision=precision,
        compile=compile,
        size=size,
        threads=threads,
    )
    report: list[ExactInversionReport] = []
    fixed_point = {"exact": exact, "max_iter": max_iter, "tol": tol, "report": report, "batch_size": batch_size}
    fitted = None
    if null_text:
        fitted = invert_null_text(
            loaded,
            originals,
            spec,
            labels,
            guidance=guidance,
            inner_steps=inner_steps,
            lr=lr,
            early_stop=early_stop,
            progress=progress,
            **fixed_point,
        )
        latents, reconstructions = fitted.latent, fitted.reconstruction
    else:
        latents = invert_images(loaded, make_eps, originals, spec, labels=labels, progress=progress, **fixed_point)
        reconstructions = _decode(loaded, make_eps, spec, latents, labels, batch_size, progress)
    metrics = reconstruction_metrics(originals, reconstructions)

    save_latents(latents, directory / "latents.npy")
    latent_view = (latents * 0.25).clamp(-1, 1)  # N(0, 1) shown with +-4 sigma across the range
    grid = torch.cat([originals, reconstructions.clamp(-1, 1), latent_view])
    save_grid(grid, directory / "grid.png", nrow=len(originals))
    lines = ["image,mse,psnr_db"] + [f"{n},{m:.6g},{q:.3f}" for n, (m, q) in zip(names, metrics, strict=True)]
    write_text_whole(directory / "metrics.csv", "\n".join(lines) + "\n")
    written = ["latents.npy", "grid.png", "metrics.csv"]
    if fitted is not None:
        save_null_embeddings(
            directory / "null_embeddings.safetensors", fitted.null_embeddings, fitted.timesteps, labels, guidance
        )
        written.append("null_embeddings.safetensors")
    if interpolate:
        frames_T = slerp(latents[0], latents[1], torch.linspace(0, 1, interpolate))
        frame_labels = None if labels is None else labels[:1].expand(len(frames_T))
        frames = _decode(loaded, make_eps, spec, frames_T, frame_labels, batch_size, None)
        save_grid(frames, directory / "interpolation.png", nrow=interpolate)
        written.append("interpolation.png")
    return InversionRun(latents, reconstructions, metrics, report, fitted, written)


def _decode(loaded, make_eps, spec, latents, labels, batch_size, progress) -> torch.Tensor:
    unused = [torch.Generator() for _ in latents]  # deterministic DDIM draws no noise
    return generate(loaded, make_eps, spec, latents, unused, labels=labels, batch_size=batch_size, progress=progress)[0]


def load_fitted_null_text(loaded: LoadedModel, spec: SamplerSpec, path: Path, count: int, classes: list[int] | None):
    """The null embeddings ``ddim invert --null-text`` fitted (S, N, D), checked against this model
    and sampler, with the labels to guide towards (the file's, or ``classes`` cycled: another
    class edits the images) and the guidance they were fitted at."""
    fitted, fitted_steps, labels, fitted_guidance = load_null_embeddings(path)
    wanted = spec.timesteps(loaded.alpha_bars)
    if not torch.equal(fitted_steps, wanted.cpu()):
        raise CheckpointError(
            f"{path} was fitted on {len(fitted_steps)} timesteps ({fitted_steps[0]}..{fitted_steps[-1]}), not the "
            f"{len(wanted)} of --steps {spec.steps} --skip {spec.skip}; pass the --steps and --skip given to invert"
        )
    if fitted.shape[1] != count:
        raise CheckpointError(f"{path} holds null embeddings for {fitted.shape[1]} images, the latents are {count}")
    if loaded.config.model.num_classes is None or fitted.shape[2] != loaded.model.temb_ch:
        raise CheckpointError(f"{path} was not fitted for this model (embedding size {fitted.shape[2]})")
    check_classes(loaded, classes or labels.tolist())
    if classes:
        labels = cycle_classes(classes, count)
    return fitted, labels, fitted_guidance


def null_text_sample_to_files(
    loaded: LoadedModel,
    spec: SamplerSpec,
    grid: Path,
    latents: Path,
    null_embeddings: Path,
    *,
    classes: list[int] | None = None,
    guidance: float | None = None,
    out_dir: Path | None = None,
    npz: Path | None = None,
    save_latents: Path | None = None,
    threads: int | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> SampleRun:
    """``ddim sample --latents L --null-embeddings E``: decode the latents of a null-text inversion
    with its fitted null embeddings (the reconstruction), towards the file's classes or
    ``classes`` (an edit), at the file's guidance or ``guidance``; written as
    :func:`~ddim_cli.jobs.sample.sample_to_files` writes."""
    shard = shard or Shard()
    given = load_latents(latents, loaded.image_shape)
    fitted, labels, fitted_guidance = load_fitted_null_text(loaded, spec, null_embeddings, len(given), classes)
    w = fitted_guidance if guidance is None else guidance
    count = len(given)
    use_cpu_threads(loaded, threads, 2 * min(batch_size, count))  # guided: two images a call
    settings = {"latents": str(latents), "null_embeddings": str(null_embeddings)}  # made at once: never resumed
    outputs = SampleFiles(
        grid,
        out_dir,
        npz,
        save_latents,
        count,
        loaded.image_shape,
        settings=settings,
        resume=False,
        enabled=shard.main,
    )
    steps = len(spec.timesteps(loaded.alpha_bars))
    with outputs:
        start = time.perf_counter()
        images = sample_null_text(
            loaded,
            given,
            labels,
            fitted,
            spec,
            guidance=w,
            batch_size=batch_size,
            progress=AllRanksProgress(progress, shard, count * steps),
            shard=shard,
        )
        seconds = time.perf_counter() - start
        outputs.add(0, given, images)
    return SampleRun(count, 0, seconds, labels, outputs.written, guidance=w)
