"""A trained checkpoint loaded for sampling: the U-Net with its config, the sampler to run and
the noise model the samplers call (class conditioning, guidance, the device's fast path).

Every job module (:mod:`ddim_cli.jobs`) and the commands start from :func:`load_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ddim_cli.acceleration import (
    JobSize,
    Precision,
    Switch,
    autocast,
    compile_model,
    counted_forward_gflop,
    estimated_eager_seconds,
    resolve_compile,
    resolve_precision,
    set_fp32_math,
    use_channels_last,
)
from ddim_cli.checkpoint import CheckpointError, list_checkpoints, load_weights, newest_intact
from ddim_cli.config import Config
from ddim_cli.guidance import classifier_free_guidance
from ddim_cli.sampling import EpsModel, plan
from ddim_cli.schedule import SPACINGS, timesteps
from ddim_cli.seeding import cycle_classes, draw_classes
from ddim_cli.threads import set_threads
from ddim_cli.unet import UNet

Progress = Callable[[int], None]  # called with the number of (image x step) units just done
# per-image class labels (None: unconditional) and optionally another guidance scale -> model
MakeEps = Callable[..., EpsModel]


@dataclass(frozen=True)
class SamplerSpec:
    """One way of sampling: the method and its timesteps."""

    method: str = "ddim"  # ddim, ddpm, dpm++2m, or consistency (a consistency student's own sampler)
    steps: int | None = 50  # None with a section-string skip (it fixes the count)
    eta: float = 0.0  # DDIM only
    skip: str = "uniform"  # timestep spacing
    variance: str = "posterior"  # DDPM only
    clip_x0: bool = True

    @property
    def label(self) -> str:
        if self.method == "ddpm":
            return f"ddpm S={self.steps}" + ("" if self.variance == "posterior" else f" var={self.variance}")
        if self.method in ("dpm++2m", "consistency"):
            return f"{self.method} S={self.steps}"
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
    ema: bool = True  # the EMA weights (else the raw ones)

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
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def run_dir(self) -> Path:
        parent = self.checkpoint.parent
        return parent.parent if parent.name in ("checkpoints", STUDENTS) else parent


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
    load_weights(model, weights, path)
    return LoadedModel(model.to(device).eval(), checkpoint.config, path, checkpoint.step, use_ema)


def require_full_model(loaded: LoadedModel, command: str) -> None:
    """invert, edit and restore follow the teacher's ODE at steps of their own: a distilled student
    (which only samples on its own steps) is a one-line CheckpointError naming its teacher."""
    distilled = loaded.config.distill
    if distilled is not None:
        raise CheckpointError(
            f"{command} needs the full model, not a {distilled.steps}-step distilled student (it only samples on its "
            f"own steps); give its teacher instead: {distilled.teacher}"
        )


def check_classes(loaded: LoadedModel, classes: list[int] | None, option: str = "--class") -> None:
    """Raise a one-line CheckpointError, naming ``option``, unless the model takes every label in
    ``classes``."""
    num_classes = loaded.config.model.num_classes
    if classes and num_classes is None:
        raise CheckpointError(f"{option} needs a class-conditional model; this one is unconditional")
    for label in classes or []:
        if not 0 <= label < num_classes:
            raise CheckpointError(f"{option} {label} is out of range; this model has classes 0..{num_classes - 1}")


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
    size: JobSize | None = None,
    threads: int | None = None,
    notify: Callable[[str], None] | None = None,
) -> MakeEps:
    """``make(labels, scale=guidance) -> eps_model`` for the checkpoint: class conditioning (``labels``: one class
    per image of the batch, or None for the null label), classifier-free guidance ``w`` (its output
    rescaled by ``guidance_rescale``, see :func:`~ddim_cli.guidance.classifier_free_guidance`), and the
    device's fast path (``auto``: bf16 autocast and ``channels_last`` on CUDA, and
    ``torch.compile`` there for a job whose ``size`` repays the build; fp32 on CPU,
    ``channels_last`` from 32x32 up; see :mod:`ddim_cli.acceleration`). A compile build is
    reported to ``notify`` (default: a line on stderr) with the time it took.

    The model's output is returned as it is: noise, data or v, as ``loaded.prediction`` says;
    guidance combines any of the three alike. ``channels_last`` converts ``loaded.model``'s
    weights in place. ``compile`` on CPU uses inductor's freezing, which prepacks the convolution
    weights: about 16% faster per evaluation on the CIFAR-10 model after a build of about a
    minute; each new batch size builds again.

    On a CPU the job runs with ``threads`` threads, or (None) as many as its ``size`` per call can
    use and other processes leave free (:mod:`ddim_cli.threads`).
    """
    num_classes = loaded.config.model.num_classes
    if guidance and num_classes is None:
        raise CheckpointError("--guidance needs a class-conditional model; this one is unconditional")
    model = loaded.model
    device = next(model.parameters()).device
    if channels_last == "auto":
        channels_last = use_channels_last(device, loaded.config.data.image_size, training=False)
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    precision = resolve_precision(precision, device)
    set_fp32_math(precision, device)
    use_cpu_threads(loaded, threads, None if size is None else size.per_call)
    eager_seconds = None
    if compile == "auto" and device.type == "cuda" and size is not None:
        eager_seconds = estimated_eager_seconds(loaded.config.unet_config(), *size, precision)
    if resolve_compile(compile, device, eager_seconds):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = device.type == "cpu"
        model = compile_model(model, notify or _note)

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


def use_cpu_threads(loaded: LoadedModel, threads: int | None, images_per_call: float | None) -> None:
    """On a CPU, run the job with ``threads`` threads, or (None) as many as calls on
    ``images_per_call`` images can use and other processes leave free (None: a job of unknown
    size, all free cores); see :mod:`ddim_cli.threads`. Nothing changes on a GPU."""
    if loaded.device.type != "cpu":
        return
    per_call = None
    if threads is None and images_per_call is not None:
        per_call = counted_forward_gflop(loaded.model, loaded.config.unet_config()) * images_per_call
    set_threads(threads, per_call)


def _note(text: str) -> None:
    import sys

    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


STUDENTS = "students"  # a distillation run's kept students: STUDENTS/S<steps>.safetensors


def kept_students(run_dir: Path) -> dict[int, Path]:
    """The students a distillation run has kept so far, by step count, most steps first."""
    found = {}
    for path in (Path(run_dir) / STUDENTS).glob("S*.safetensors"):
        if path.stem[1:].isdigit():
            found[int(path.stem[1:])] = path
    return dict(sorted(found.items(), reverse=True))


def student_for_steps(loaded: LoadedModel, steps: int | None = None) -> LoadedModel:
    """For a distilled student, the one that samples with ``steps`` (None: the run's own count): a
    progressive run keeps one student per round (``students/S<N>.safetensors``; a run's in-progress
    checkpoint, in its ``checkpoints/``, is never sampled; a student file anywhere else samples as
    itself); a consistency student serves the step counts on its grid. A
    CheckpointError names the step counts the run can serve. A teacher is returned as it is."""
    distilled = loaded.config.distill
    if distilled is None:
        return loaded
    steps = distilled.steps if steps is None else steps
    if distilled.sampler == "consistency":
        from ddim_cli.distillation.consistency import consistency_times

        try:
            consistency_times(loaded.config.diffusion.num_timesteps, distilled.grid_size, steps)
        except ValueError as error:
            raise CheckpointError(str(error)) from None
    folder = loaded.checkpoint.parent.name
    if folder != "checkpoints" and (steps == distilled.steps or distilled.sampler == "consistency"):
        return loaded  # a kept student given as a file: in students/, or copied or converted elsewhere
    if folder not in ("checkpoints", STUDENTS):  # no run around it to hold students of other step counts
        raise CheckpointError(
            f"{loaded.checkpoint} is a {distilled.steps}-step {distilled.method} student; "
            f"sample it with --steps {distilled.steps}"
        )
    served = kept_students(loaded.run_dir)
    if distilled.sampler == "consistency" and served:
        return load_model(served[max(served)], use_ema=True, device=next(loaded.model.parameters()).device)
    if steps not in served:
        if not served:
            raise CheckpointError(f"{loaded.run_dir} has kept no student yet: its first round has not finished")
        counts = ", ".join(map(str, sorted(served, reverse=True)))
        raise CheckpointError(f"this distillation run has students for {counts} steps, not {steps}")
    return load_model(served[steps], use_ema=True, device=next(loaded.model.parameters()).device)
