"""What the commands that run a model share: the checkpoint and inputs a user names, every output
checked before any work, and a job on one process or on each of torchrun's ranks."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer

from ddim_cli.commands.errors import fail, user_errors
from ddim_cli.commands.options import Device


def auto_switch(switch: bool | None) -> bool | str:
    """An unset --flag/--no-flag is the library's "auto"."""
    return "auto" if switch is None else switch


def torch_device(choice: Device) -> str:
    import torch

    if choice is Device.cuda and not torch.cuda.is_available():
        fail("--device cuda was asked for, but CUDA is not available")
    return "cuda" if choice is Device.cuda or (choice is Device.auto and torch.cuda.is_available()) else "cpu"


# The file options that name one format wherever they appear, and the suffix their names must end in.
OUTPUT_SUFFIXES = {"--npz": ".npz", "--save-stats": ".npz", "--save-latents": ".npy"}


def check_outputs(files=(), directories=(), inputs=()) -> None:
    """Every ``(option, path)`` a command will write, checked before its work (None: not asked for);
    a file must end in the suffix of its option in :data:`OUTPUT_SUFFIXES`, or in a third item
    ``(option, path, suffix)``."""
    from ddim_cli.outputs import check_output

    inputs = [p for p in inputs if p is not None]
    for option, path, *given in files:
        if path is not None:
            suffix = given[0] if given else OUTPUT_SUFFIXES.get(option)
            check_output(path, inputs=inputs, option=option, suffix=suffix)
    for option, path in directories:
        if path is not None:
            check_output(path, directory=True, inputs=inputs, option=option)


def load_run(checkpoint: Path | None, ema: bool, device: Device, where=None, steps: int | None = None):
    """The checkpoint on ``where`` (a torch.device chosen elsewhere, e.g. this rank's GPU) or
    ``device``; for a distilled student's run, the student that samples with ``steps``."""
    from ddim_cli.models import load_model, resolve_checkpoint, student_for_steps

    candidates, note = resolve_checkpoint(checkpoint)
    if note:
        typer.echo(note, err=True)
    loaded = load_model(candidates, use_ema=ema, device=torch_device(device) if where is None else where)
    return student_for_steps(loaded, steps)


@contextmanager
def job_on_ranks(
    device: Device,
    checkpoint: Path | None,
    ema: bool,
    *,
    files=(),
    directories=(),
    inputs=(),
    steps: int | None = None,
    full_model_for: str | None = None,
):
    """``(shard, loaded)`` for a job, with one-line errors: this process joins torchrun's ranks (or
    runs alone), checks every output it was asked for, and loads the checkpoint on its device (a
    distilled run's student for ``steps``; ``full_model_for`` names a command that needs the full
    model). After the job the ranks leave together; rank 0 (``shard.main``) then writes."""
    from ddim_cli import distributed
    from ddim_cli.models import require_full_model

    with user_errors():
        shard, where = distributed.setup(device.value)
        check_outputs(files, directories, inputs)
        loaded = load_run(checkpoint, ema, device, where, steps)
        if full_model_for:
            require_full_model(loaded, full_model_for)
        yield shard, loaded
        distributed.finish(shard)


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


def rescale_or_config(loaded, option: float | None) -> float:
    """--guidance-rescale, or the config's sample.guidance_rescale."""
    return loaded.config.sample.guidance_rescale if option is None else option


def number_list(text: str, kind: type, option: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated numbers, got {text!r}", code=2)
    if not values:
        fail(f"{option} needs at least one value", code=2)
    return values


def parse_classes(text: str | None) -> list[int] | None:
    return None if text is None else number_list(text, int, "--class")
