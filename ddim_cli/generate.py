"""What ``ddim sample``, ``invert`` and ``compare`` do, as functions over a loaded checkpoint.

Randomness follows EDM's per-seed convention (:mod:`ddim_cli.seeding`): image ``i`` gets its own
generator seeded with ``seed + i``; its x_T is the first draw, its class (for a class-conditional
model) the second, and any sampler noise the following ones. An image is therefore the same
whatever the batch size, the number of images or the device it is drawn on.

Each generating function takes an optional ``shard`` (:class:`ddim_cli.distributed.Shard`): under
torchrun each rank computes its images of every batch (image ``i`` on rank ``i % world``) and
every rank returns all of them, as one process would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ddim_cli.acceleration import Precision, Switch, autocast, resolve_compile, resolve_precision, use_channels_last
from ddim_cli.checkpoint import CheckpointError, describe_mismatch, list_checkpoints, newest_intact
from ddim_cli.config import Config
from ddim_cli.distributed import Shard
from ddim_cli.editing import ddib, sdedit, sdedit_timesteps
from ddim_cli.guidance import classifier_free_guidance
from ddim_cli.null_text import NULL_TEXT_INNER_STEPS, NullTextInversion, null_text_guidance, null_text_inversion
from ddim_cli.restoration import Degradation, model_calls, restore
from ddim_cli.sampling import EXACT_TOL, EpsModel, ExactInversionReport, invert, plan, sample
from ddim_cli.schedule import SPACINGS, timesteps
from ddim_cli.seeding import cycle_classes, draw_classes, seeded_noise, side_generator
from ddim_cli.unet import UNet

Progress = Callable[[int], None]  # called with the number of (image x step) units just done
# per-image class labels (None: unconditional) and optionally another guidance scale -> model
MakeEps = Callable[..., EpsModel]


@dataclass(frozen=True)
class SamplerSpec:
    """One way of sampling: the method and its timesteps."""

    method: str = "ddim"  # ddim or ddpm
    steps: int | None = 50  # None with a section-string skip (it fixes the count)
    eta: float = 0.0  # DDIM only
    skip: str = "uniform"  # timestep spacing
    variance: str = "posterior"  # DDPM only
    clip_x0: bool = True

    @property
    def label(self) -> str:
        if self.method == "ddpm":
            return f"ddpm S={self.steps}" + ("" if self.variance == "posterior" else f" var={self.variance}")
        if self.method == "dpm++2m":
            return f"dpm++2m S={self.steps}"
        return f"ddim S={self.steps} eta={self.eta:g}"

    @property
    def slug(self) -> str:
        """A file-name form of the label, e.g. ``ddim-S20-eta0.5``."""
        return self.label.replace(" S=", "-S").replace(" eta=", "-eta").replace(" var=", "-var")

    def timesteps(self, alpha_bars: torch.Tensor) -> torch.Tensor:
        steps = self.steps if self.skip in SPACINGS else None
        return timesteps(len(alpha_bars), steps, self.skip, alpha_bars)

    def check(self, alpha_bars: torch.Tensor) -> None:
        """Raise ValueError (naming the numbers) if this sampler cannot run on the schedule."""
        eta = self.eta if self.method == "ddim" else 0.0
        plan(alpha_bars, self.timesteps(alpha_bars), method=self.method, eta=eta, variance=self.variance)


@dataclass
class LoadedModel:
    model: UNet
    config: Config
    checkpoint: Path
    step: int

    @cached_property
    def alpha_bars(self) -> torch.Tensor:
        return self.config.alpha_bars()

    @property
    def prediction(self) -> str:
        return self.config.model.prediction

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.data.channels, self.config.data.image_size, self.config.data.image_size)

    @property
    def run_dir(self) -> Path:
        parent = self.checkpoint.parent
        return parent.parent if parent.name == "checkpoints" else parent


def resolve_checkpoint(path: Path | None, runs_root: Path = Path("runs")) -> tuple[list[Path], str | None]:
    """The checkpoint files to try, newest first: the file given; a run directory's checkpoints;
    or (None) those of the most recently updated run. :func:`load_model` loads the first intact one.

    Returns the files and, when the run was chosen for the user, a note saying which.
    """
    if path is None:
        latest = [found for run in sorted(runs_root.glob("*")) if (found := list_checkpoints(run / "checkpoints"))]
        if not latest:
            raise CheckpointError(
                f"no checkpoint given and no trained run under {runs_root}/; train one first "
                f"(ddim train configs/digits.yaml) or pass a checkpoint file or run directory"
            )
        chosen = max(latest, key=lambda found: found[-1].stat().st_mtime)
        return chosen[::-1], f"using the most recently updated run: {chosen[-1].parent.parent}"
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoints in {path}")
        return found[::-1], None
    return [path], None


def load_model(path: Path | Sequence[Path], *, use_ema: bool = True, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the U-Net from the config inside the checkpoint and load its (EMA) weights. Given
    several files (newest first, as :func:`resolve_checkpoint` lists a run's), the newest intact
    one is used, with a warning for each damaged one before it."""
    checkpoint = newest_intact([Path(path)] if isinstance(path, str | Path) else list(path))
    path = checkpoint.path
    weights = checkpoint.ema if use_ema else checkpoint.model
    if not weights:
        raise CheckpointError(f"{path} holds no {'EMA' if use_ema else 'model'} weights")
    model = UNet(checkpoint.config.unet_config())
    mismatch = describe_mismatch(model.state_dict(), weights)
    if mismatch:
        raise CheckpointError(f"the weights in {path} do not fit its config: {mismatch}")
    model.load_state_dict(weights)
    return LoadedModel(model.to(device).eval(), checkpoint.config, path, checkpoint.step)


def check_classes(loaded: LoadedModel, classes: list[int] | None) -> None:
    """Raise a one-line CheckpointError unless the model takes every label in ``classes``."""
    num_classes = loaded.config.model.num_classes
    if classes and num_classes is None:
        raise CheckpointError("--class needs a class-conditional model; this one is unconditional")
    for label in classes or []:
        if not 0 <= label < num_classes:
            raise CheckpointError(f"--class {label} is out of range; this model has classes 0..{num_classes - 1}")


def class_labels(
    loaded: LoadedModel,
    generators: list[torch.Generator],
    *,
    classes: list[int] | None = None,
    unconditional: bool = False,
    first_index: int = 0,
) -> torch.Tensor | None:
    """The class of each image, as ``ddim sample`` chooses it; None means the null label.

    For a class-conditional model every image's generator yields a class right after its x_T
    (always, so that its noise stream does not depend on the choice below); it is used unless
    ``classes`` is given (cycled over the images, which are numbered from ``first_index``) or
    ``unconditional`` asks for the null label.
    An unconditional model takes neither ``classes`` nor any draw.
    """
    check_classes(loaded, classes)
    num_classes = loaded.config.model.num_classes
    if num_classes is None:
        return None
    if classes and unconditional:
        raise CheckpointError("--class and --unconditional exclude each other")
    drawn = draw_classes(generators, num_classes)
    if unconditional:
        return None
    return cycle_classes(classes, len(generators), first_index) if classes else drawn


def noise_model(
    loaded: LoadedModel,
    *,
    guidance: float = 0.0,
    guidance_rescale: float = 0.0,
    precision: Precision = "auto",
    compile: Switch = "auto",
    channels_last: Switch = "auto",
) -> MakeEps:
    """``make(labels, scale=guidance) -> eps_model`` for the checkpoint: class conditioning (``labels``: one class
    per image of the batch, or None for the null label), classifier-free guidance ``w`` (its output
    rescaled by ``guidance_rescale``, see :func:`~ddim_cli.guidance.classifier_free_guidance`), and the
    device's fast path (``auto``: bf16 autocast, ``channels_last`` and ``torch.compile`` on CUDA;
    fp32 on CPU, ``channels_last`` from 32x32 up; see :mod:`ddim_cli.acceleration`).

    The model's output is returned as it is: noise, data or v, as ``loaded.prediction`` says;
    guidance combines any of the three alike. ``channels_last`` converts ``loaded.model``'s
    weights in place. ``compile`` on CPU uses inductor's freezing, which prepacks the convolution
    weights: about 16% faster per evaluation on the CIFAR-10 model after a build of about a
    minute; each new batch size builds again.
    """
    num_classes = loaded.config.model.num_classes
    if guidance and num_classes is None:
        raise CheckpointError("--guidance needs a class-conditional model; this one is unconditional")
    model = loaded.model
    device = next(model.parameters()).device
    if channels_last == "auto":
        channels_last = use_channels_last(device, loaded.config.data.image_size, training=False)
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if resolve_compile(compile, device):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = device.type == "cpu"
        model = torch.compile(model)
    precision = resolve_precision(precision, device)

    def with_precision(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(precision, device):
            # The sampler's state stays in the standard layout whatever the model's is.
            return model(x, t, y).to(dtype=x.dtype, memory_format=torch.contiguous_format)

    def make(labels: torch.Tensor | None, scale: float = guidance) -> EpsModel:
        if labels is None:
            if scale:
                raise CheckpointError("--guidance needs class labels; the null label cannot be guided")
            return with_precision
        return classifier_free_guidance(with_precision, labels, scale, null_label=num_classes, rescale=guidance_rescale)

    return make


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
            make_eps(_pick(labels, index)),
            batch,
            ab,
            ts,
            method=spec.method,
            eta=eta,
            variance=spec.variance,
            clip_x0=spec.clip_x0,
            prediction=loaded.prediction,
            generator=[generators[i] for i in index],
            callback=_counter(progress, len(batch)),
        )

    start = time.perf_counter()
    images = _in_batches(loaded, x_T, batch_size, run, shard)
    return images, (time.perf_counter() - start) / len(x_T)


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
            make_eps(_pick(labels, index)),
            batch,
            ab,
            ts,
            prediction=loaded.prediction,
            exact=exact,
            max_iter=max_iter,
            tol=tol,
            report=report,
            callback=_counter(progress, len(batch)),
        )

    return _in_batches(loaded, images, batch_size, run, shard)


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
        return sample(eps_model, batch, ab, ts, prediction=loaded.prediction, callback=_counter(progress, len(batch)))

    return _in_batches(loaded, latents, batch_size, run, shard)


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
    ``spec``). Guided decoding rescales by ``guidance_rescale`` (see :func:`noise_model`).
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
    make_eps = noise_model(loaded, guidance_rescale=guidance_rescale, precision="fp32")

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
            source = make_eps(_pick(from_labels, index), 0.0)
            edited = ddib(source, target, batch, ab, ts, prediction=loaded.prediction, exact=exact)[0]
        if progress is not None:
            progress(len(batch))
        return edited

    return _in_batches(loaded, images, batch_size, run, shard)


# Keys of the degradation's own random streams (seeding.side_generator), apart from the images'.
DEGRADE_NOISE, RANDOM_MASK = 1, 2


def mask_generator(seed: int) -> torch.Generator:
    """The generator a ``random:P`` mask is drawn from for ``--seed seed``."""
    return side_generator(seed, RANDOM_MASK)


def degrade_images(degradation: Degradation, images: torch.Tensor, seed: int) -> torch.Tensor:
    """``A x + sigma n`` of clean images in [-1, 1]; image ``i``'s noise comes from its own side
    generator (``side_generator(seed, DEGRADE_NOISE, i)``), never from a restoration's stream."""
    shape = degradation.observation_shape(tuple(images.shape[1:]))
    noise = None
    if degradation.sigma:
        generators = [side_generator(seed, DEGRADE_NOISE, i) for i in range(len(images))]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return degradation.observe(images, noise)


def restore_images(
    loaded: LoadedModel,
    make_eps: MakeEps,
    observations: torch.Tensor,
    degradation: Degradation,
    spec: SamplerSpec,
    *,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    samples_per_input: int = 1,
    method: str = "ddnm",
    jump: int = 1,
    resample: int = 1,
    batch_size: int,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> torch.Tensor:
    """``samples_per_input`` restorations of each observation (input-major: restoration ``j`` of
    input ``i`` is image ``k = i * samples_per_input + j``, drawn from seed ``seed + k``), with
    ``labels`` (one per input; None: the null label) and the config's guidance in ``make_eps``.
    Returns (N * samples_per_input, C, H, W) on the CPU, unclamped."""
    ab = loaded.alpha_bars
    ts = spec.timesteps(ab)
    model_calls(len(ts), jump, resample)  # checks jump and resample before any work
    if not (isinstance(samples_per_input, int) and samples_per_input >= 1):
        raise ValueError(f"samples_per_input must be an integer >= 1, got {samples_per_input!r}")
    expected = degradation.observation_shape(loaded.image_shape)
    if tuple(observations.shape[1:]) != tuple(expected):
        raise ValueError(f"the observations have shape {tuple(observations.shape[1:])}; this model needs {expected}")
    repeated = observations.repeat_interleave(samples_per_input, 0)
    labels = None if labels is None else labels.repeat_interleave(samples_per_input, 0)
    x_T, generators = seeded_noise(loaded.image_shape, list(range(seed, seed + len(repeated))))

    def run(index: list[int], batch: torch.Tensor) -> torch.Tensor:
        count = len(batch)
        return restore(
            make_eps(_pick(labels, index)),
            repeated[index],
            degradation,
            ab,
            ts,
            batch,
            method=method,
            eta=spec.eta,
            jump=jump,
            resample=resample,
            clip_x0=spec.clip_x0,
            prediction=loaded.prediction,
            generator=[generators[i] for i in index],
            callback=_counter(progress, count),
        )

    return _in_batches(loaded, x_T, batch_size, run, shard)


def _pick(labels: torch.Tensor | None, index: list[int]) -> torch.Tensor | None:
    return None if labels is None else labels[index]


def _in_batches(
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


def _counter(progress: Progress | None, batch: int):
    return None if progress is None else (lambda i, t, x, x0: progress(batch))


def reconstruction_metrics(originals: torch.Tensor, reconstructions: torch.Tensor) -> list[tuple[float, float]]:
    """Per-image (MSE per dimension on [-1, 1], as in the DDIM paper's Table 2; PSNR in dB on [0, 1])."""
    mse = (originals.float() - reconstructions.float()).pow(2).flatten(1).mean(1)
    # On [-1, 1] the peak-to-peak range is 2, so PSNR = 10 log10(2^2 / MSE).
    return [(float(m), 10 * math.log10(4 / float(m)) if m > 0 else math.inf) for m in mse]


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
