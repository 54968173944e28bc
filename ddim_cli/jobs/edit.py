"""What ``ddim edit`` does: real images turned into another class (DDIB, SDEdit, null-text), and
the files the command writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ddim_cli.acceleration import job_size
from ddim_cli.batches import in_batches, pick
from ddim_cli.checkpoint import CheckpointError
from ddim_cli.distributed import Shard
from ddim_cli.editing import ddib, sdedit, sdedit_timesteps
from ddim_cli.images import save_grid, save_npz, save_pngs, to_uint8
from ddim_cli.jobs.invert import invert_null_text, sample_null_text
from ddim_cli.models import LoadedModel, Progress, SamplerSpec, check_classes, noise_model, use_cpu_threads
from ddim_cli.outputs import write_text_whole

EDIT_METHODS = ("ddib", "sdedit")


def edit_images(
    loaded: LoadedModel,
    images: torch.Tensor,
    spec: SamplerSpec,
    to_labels: torch.Tensor,
    *,
    from_labels: torch.Tensor | None = None,
    method: str = "ddib",
    guidance: float = 0.0,
    guidance_rescale: float = 0.0,
    strength: float = 0.6,
    noise: torch.Tensor | None = None,
    exact: bool = True,
    null_text: bool = False,
    threads: int | None = None,
    batch_size: int,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] turned into ``to_labels``' classes (:mod:`ddim_cli.editing`).

    ``ddib``: invert under ``from_labels`` (None: the null label), unguided, exactly if ``exact``;
    decode under the target with guidance ``w``. With ``null_text`` the inversion is null-text
    inversion under ``from_labels`` at guidance ``w``, and the decoding keeps its per-step null
    embeddings (the null-text recipe for editing; it does not rescale). ``sdedit``: diffuse with
    ``noise`` to ``strength * T`` and denoise under the target with guidance ``w`` (clipping as
    ``spec``). Guided decoding rescales by ``guidance_rescale`` (see :func:`noise_model`). On a CPU
    with ``threads`` threads (None: as many as the batches can use, see :mod:`ddim_cli.threads`).
    """
    if method not in EDIT_METHODS:
        raise ValueError(f"unknown edit method {method!r}; choose one of {', '.join(EDIT_METHODS)}")
    if loaded.config.model.num_classes is None:
        raise CheckpointError("editing to a class needs a class-conditional model; this one is unconditional")
    check_classes(loaded, to_labels.tolist() + ([] if from_labels is None else from_labels.tolist()))
    ab, ts = loaded.alpha_bars, spec.timesteps(loaded.alpha_bars)
    if method == "sdedit":
        if noise is None:
            raise ValueError("sdedit needs the noise to diffuse with")
        sdedit_timesteps(ts, len(ab), strength)  # checks strength before any work
    if null_text:
        if method != "ddib" or from_labels is None or not guidance:
            raise CheckpointError("null-text editing needs the ddib method, --from-class J and --guidance W > 0")
        use_cpu_threads(loaded, threads, 2 * min(batch_size, len(images)))  # guided: two images a call
        fitted = invert_null_text(
            loaded, images, spec, from_labels, guidance=guidance, batch_size=batch_size, exact=exact, shard=shard
        )
        edited = sample_null_text(
            loaded,
            fitted.latent,
            to_labels,
            fitted.null_embeddings,
            spec,
            guidance=guidance,
            batch_size=batch_size,
            shard=shard,
        )
        if progress is not None:
            progress(len(images))
        return edited
    # one model (and one compile) for both directions
    per_step = (5 if exact and method == "ddib" else 1) + 1  # invert (exactly: about 5 calls), decode
    size = job_size(len(images), per_step * len(ts), batch_size, guided=bool(guidance))
    make_eps = noise_model(loaded, guidance_rescale=guidance_rescale, precision="fp32", size=size, threads=threads)

    def run(index: list[int], batch: torch.Tensor) -> torch.Tensor:
        target = make_eps(to_labels[index], guidance)
        if method == "sdedit":
            edited = sdedit(
                target,
                batch,
                noise[index],
                ab,
                ts,
                strength=strength,
                prediction=loaded.prediction,
                clip_x0=spec.clip_x0,
            )
        else:
            source = make_eps(pick(from_labels, index), 0.0)
            edited = ddib(source, target, batch, ab, ts, prediction=loaded.prediction, exact=exact)[0]
        if progress is not None:
            progress(len(batch))
        return edited

    return in_batches(loaded, images, batch_size, run, shard)


def write_edits(
    directory: Path,
    originals: torch.Tensor,
    edited: torch.Tensor,
    names: Sequence[str],
    to_labels: torch.Tensor,
    from_labels: torch.Tensor | None = None,
    npz: Path | None = None,
) -> tuple[list[float], list[str]]:
    """What ``ddim edit`` writes into ``directory``: grid.png (originals above edits),
    edited/NNNNNN.png and distances.csv (each edit's per-dimension MSE to its source on [-1, 1]),
    and the edits as ``npz`` if given. Returns the distances and the paths written."""
    edited = edited.clamp(-1, 1)
    distances = (edited - originals).pow(2).flatten(1).mean(1).tolist()
    save_grid(torch.cat([originals, edited]), directory / "grid.png", nrow=len(originals))
    save_pngs(edited, directory / "edited")
    sources = ["null"] * len(names) if from_labels is None else from_labels.tolist()
    rows = zip(names, sources, to_labels.tolist(), distances, strict=True)
    lines = ["image,from_class,to_class,mse_to_source"] + [f"{n},{s},{t},{d:.6g}" for n, s, t, d in rows]
    write_text_whole(directory / "distances.csv", "\n".join(lines) + "\n")
    written = [f"{directory}/ (grid.png, edited/, distances.csv)"]
    if npz is not None:
        save_npz(to_uint8(edited), npz)
        written.append(str(npz))
    return distances, written
