"""What several commands do alike: one-line errors, loading a run, the sampler and noise model
from the options, progress bars, class lists, images and FID statistics."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from ddim_cli.commands.options import Device, Sampler, Variance


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def auto_switch(switch: bool | None) -> bool | str:
    """An unset --flag/--no-flag is the library's "auto"."""
    return "auto" if switch is None else switch


def torch_device(choice: Device) -> str:
    import torch

    if choice is Device.cuda and not torch.cuda.is_available():
        fail("--device cuda was asked for, but CUDA is not available")
    return "cuda" if choice is Device.cuda or (choice is Device.auto and torch.cuda.is_available()) else "cpu"


def check_outputs(files=(), directories=(), inputs=()) -> None:
    """Every ``(option, path)`` a command will write, checked before its work (None: not asked for)."""
    from ddim_cli.outputs import check_output

    inputs = [p for p in inputs if p is not None]
    for option, path in files:
        if path is not None:
            check_output(path, inputs=inputs, option=option)
    for option, path in directories:
        if path is not None:
            check_output(path, directory=True, inputs=inputs, option=option)


@contextmanager
def user_errors():
    """Our one-line errors become ``error: ...`` and exit 1; bad option values exit 2."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.export import ExportError
    from ddim_cli.fid import FIDError
    from ddim_cli.images import ImageFileError
    from ddim_cli.outputs import OutputError

    try:
        yield
    except (CheckpointError, ImageFileError, FIDError, OutputError, ExportError) as error:
        fail(str(error))
    except ValueError as error:  # the library's checks of steps, eta, spacing, ...
        fail(str(error), code=2)
    except Exception as error:
        fail_if_compile_error(error, "run again with --no-compile")
        raise


def fail_if_compile_error(error: Exception, remedy: str) -> None:
    """torch.compile is on by default on CUDA; a machine without its toolchain (Triton, a C
    compiler) fails inside it. Say so in one line instead of dynamo's long traceback."""
    module = type(error).__module__
    if module.startswith(("torch._dynamo", "torch._inductor")):
        cause = error.__cause__ or getattr(error, "inner_exception", None) or error
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        fail(f"torch.compile failed ({type(cause).__name__}: {first_line}); {remedy}")


def load_run(checkpoint: Path | None, ema: bool, device: Device, where=None, steps: int | None = None):
    """The checkpoint on ``where`` (a torch.device chosen elsewhere, e.g. this rank's GPU) or
    ``device``; for a distilled student's run, the student that samples with ``steps``."""
    from ddim_cli.models import load_model, resolve_checkpoint, student_for_steps

    candidates, note = resolve_checkpoint(checkpoint)
    if note:
        typer.echo(note, err=True)
    loaded = load_model(candidates, use_ema=ema, device=torch_device(device) if where is None else where)
    return student_for_steps(loaded, steps)


def refuse_students(loaded, command: str) -> None:
    """invert, edit and restore follow the teacher's ODE at steps of their own: a student cannot."""
    from ddim_cli.checkpoint import CheckpointError

    distilled = loaded.config.distill
    if distilled is not None:
        raise CheckpointError(
            f"{command} needs the full model, not a {distilled.steps}-step distilled student (it only samples on its "
            f"own steps); give its teacher instead: {distilled.teacher}"
        )


def sampler_spec(loaded, sampler: Sampler, steps, eta, skip, variance: Variance, clip_x0):
    from ddim_cli.models import SamplerSpec

    cfg = loaded.config.sample
    if loaded.config.distill is not None:
        return _student_spec(loaded, sampler, steps, eta, skip, clip_x0)
    if sampler is not Sampler.ddim and eta:
        raise ValueError("--eta applies to --sampler ddim only")
    if sampler is Sampler.ddpm and steps is None:
        steps = loaded.config.diffusion.num_timesteps  # DDPM's own setting: every training step
    if sampler is Sampler.dpm_solver and skip is None:
        skip = "logsnr"  # DPM-Solver steps in log-SNR
    spec = SamplerSpec(
        method=sampler.value,
        steps=cfg.steps if steps is None else steps,
        eta=cfg.eta if sampler is Sampler.ddim and eta is None else (eta or 0.0),
        skip=cfg.skip if skip is None else skip,
        variance=variance.value,
        clip_x0=cfg.clip_x0 if clip_x0 is None else clip_x0,
    )
    spec.check(loaded.alpha_bars)
    return spec


def _student_spec(loaded, sampler: Sampler, steps, eta, skip, clip_x0):
    """A student samples as it was distilled: its own sampler on the grid it learned, deterministic
    for progressive students (DDIM, eta 0)."""
    from ddim_cli.models import SamplerSpec

    distilled = loaded.config.distill
    own = distilled.sampler
    if sampler is not Sampler.ddim:
        raise ValueError(f"a {distilled.method} student samples with its own sampler ({own}); drop --sampler")
    if eta and own == "ddim":
        raise ValueError("a progressive student learned deterministic DDIM steps; drop --eta")
    if skip not in (None, distilled.spacing):
        raise ValueError(f"a distilled student samples on the {distilled.spacing} grid it learned; drop --skip")
    spec = SamplerSpec(
        own,
        distilled.steps if steps is None else steps,
        0.0,
        distilled.spacing,
        clip_x0=(loaded.config.sample.clip_x0 if clip_x0 is None else clip_x0),
    )
    spec.check(loaded.alpha_bars)
    return spec


def parse_classes(text: str | None) -> list[int] | None:
    return None if text is None else number_list(text, int, "--class")


def labels_and_guidance(
    loaded, generators, classes: str | None, unconditional: bool, guidance: float | None, first_index: int = 0
):
    """Per-image class labels (None: the null label) of images numbered from ``first_index`` and the
    guidance w, as `sample` and `compare` choose them; an explicit --guidance that cannot apply is an
    error, the config's is dropped."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.models import class_labels

    distilled = loaded.config.distill
    if guidance and distilled is not None:
        raise CheckpointError(
            f"this student learned its teacher guided at w={distilled.guidance:g} and samples so in one call per "
            "step; --guidance does not apply"
        )
    labels = class_labels(
        loaded, generators, classes=parse_classes(classes), unconditional=unconditional, first_index=first_index
    )
    if labels is None:
        if guidance:
            why = "--unconditional samples with the null label" if unconditional else "this model is unconditional"
            raise CheckpointError(f"--guidance needs class labels; {why}")
        return None, 0.0
    return labels, loaded.config.sample.guidance if guidance is None else guidance


def rescale_or_config(loaded, option: float | None) -> float:
    """--guidance-rescale, or the config's sample.guidance_rescale."""
    return loaded.config.sample.guidance_rescale if option is None else option


def command_noise_model(
    loaded, guidance: float, rescale_option: float | None, precision, compile_model, size=None, threads=None
):
    """The checkpoint's noise model as the sampling commands run it: guidance w, its rescale
    (--guidance-rescale or the config's), --precision and --compile (``auto`` decided from the
    job's ``size``, an :class:`~ddim_cli.acceleration.JobSize`)."""
    from ddim_cli import models as g

    return g.noise_model(
        loaded,
        guidance=guidance,
        guidance_rescale=rescale_or_config(loaded, rescale_option),
        precision=precision.value,
        compile=auto_switch(compile_model),
        size=size,
        threads=threads,
    )


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "img-step"):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, desc=desc, dynamic_ncols=True)


def rank_progress(bar, shard):
    """This rank's progress counted for all ranks (they share the work evenly), up to the bar's total."""
    if bar.total is None:
        return lambda done: bar.update(done * shard.world)
    return lambda done: bar.update(min(done * shard.world, bar.total - bar.n))


def invert_labels(loaded, classes: str | None, guidance: float, count: int):
    """``--class K[,K...]`` cycled over the images to invert, or None (the null label)."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.models import check_classes
    from ddim_cli.seeding import cycle_classes

    if classes is None:
        if guidance:
            raise CheckpointError("--guidance needs --class K (the null label cannot be guided)")
        return None
    wanted = parse_classes(classes)
    check_classes(loaded, wanted)
    return cycle_classes(wanted, count)


def class_summary(labels) -> str:
    counts = labels.bincount().tolist()
    return ", ".join(f"{k}: {c}" for k, c in enumerate(counts) if c)


def checkpoint_and_images(paths: list[Path], verb: str) -> tuple[Path | None, list[Path]]:
    """Split ``[CHECKPOINT] IMAGE...``: the first path is the checkpoint if it is a run directory
    or a .safetensors file."""
    checkpoint, images = (
        (paths[0], paths[1:]) if paths[0].is_dir() or paths[0].suffix == ".safetensors" else (None, paths)
    )
    if not images:
        fail(f"give at least one image to {verb}", code=2)
    return checkpoint, images


def load_inputs(loaded, images: list[Path]):
    """The images as the model was trained on them (channels, size, resize mode), noting changes."""
    from ddim_cli.data import resize_mode
    from ddim_cli.images import load_images

    data = loaded.config.data
    originals, notes = load_images(images, data.image_size, data.channels, resize_mode(data))
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    return originals


def fid_statistics(f, opened, extract, progress, desc: str, shard=None):
    """Statistics of a source opened with ``fid.open_source`` (a statistics file is used as it is)."""
    from tqdm import tqdm

    from ddim_cli.distributed import Shard

    if isinstance(opened, dict):
        return opened
    shard = shard or Shard()
    with tqdm(disable=not progress, unit="img", desc=desc) as bar:
        return f.statistics(opened, extract, progress=rank_progress(bar, shard), shard=shard)


def save_fid_stats(f, stats, path: Path | None) -> None:
    if path is not None:
        f.save_statistics(stats, path)
        typer.echo(f"wrote reference statistics to {path}", err=True)


def number_list(text: str, kind: type, option: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated numbers, got {text!r}", code=2)
    if not values:
        fail(f"{option} needs at least one value", code=2)
    return values
