"""The ``ddim`` command: a thin Typer layer over the library (one function per command)."""

from __future__ import annotations

import os
import signal
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from ddim_cli import __version__


class _Group(TyperGroup):
    """The command group with the tool's last line of defence: an ``OSError`` that no command
    turned into a message (a full disk, a permission, a read-only file system) is one line and exit
    1; any other exception is a bug, reported in one line with how to see its traceback
    (``DDIM_DEBUG=1`` re-raises both)."""

    def get_params(self, ctx):
        return _without_flag_metavars(super().get_params(ctx))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None
        except Exception as error:
            # Usage errors, --help and exits belong to the command-line framework (typer vendors its click).
            if os.environ.get("DDIM_DEBUG") == "1" or type(error).__module__.split(".")[0] in ("click", "typer"):
                raise
            if isinstance(error, OSError):
                from ddim_cli.errors import describe_os_error

                typer.echo(f"error: {describe_os_error(error)}", err=True)
            else:
                first = (str(error).strip().splitlines() or [""])[0]
                typer.echo(
                    f"error: internal error ({type(error).__name__}: {first}); this is a bug: please report it "
                    "with the command you ran (DDIM_DEBUG=1 shows the traceback)",
                    err=True,
                )
            raise typer.Exit(code=1) from None


def _without_flag_metavars(params: list) -> list:
    """Flags take no value, so --help shows none for them (typer would show ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """Every command: its --help shows no value for flags."""

    def get_params(self, ctx):
        return _without_flag_metavars(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    name="ddim",
    help="Train denoising diffusion models and sample them with DDPM and DDIM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings' single line breaks rewrap; `code` shows as code
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ddim-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train denoising diffusion models and sample them with DDPM and DDIM."""


# Each command's --help groups its options: its own in "Options", then these shared panels.
SAMPLER_PANEL = "Sampler"
CLASSES_PANEL = "Classes and guidance"
OUTPUT_PANEL = "Outputs"
HARDWARE_PANEL = "Hardware and speed"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


@app.command(cls=_Command)
def train(
    config_path: Annotated[
        Path | None, typer.Argument(metavar="CONFIG", help="YAML config (see configs/). Not needed with --resume.")
    ] = None,
    overrides: Annotated[
        list[str],
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Override a config key, e.g. --set train.batch_size=64. Repeatable."
        ),
    ] = [],  # noqa: B006 (Typer reads the default, never mutates it)
    run_dir: Annotated[
        Path | None, typer.Option(help="Where checkpoints, samples and logs go (default: runs/<config name>).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(metavar="RUN_DIR", help="Continue the run in RUN_DIR from its latest checkpoint.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh in an existing run directory, replacing its run.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    device: Annotated[
        Device, typer.Option(help="Where to train; auto picks CUDA when available.", rich_help_panel=HARDWARE_PANEL)
    ] = Device.auto,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.", rich_help_panel=OUTPUT_PANEL)] = True,
) -> None:
    """Train a diffusion model from a YAML config (multi-GPU: launch with torchrun)."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.config import ConfigError, load_config
    from ddim_cli.runlock import RunBusyError
    from ddim_cli.train import TrainingError, TrainingInterrupted
    from ddim_cli.train import train as run_training

    if (config_path is None) == (resume is None):
        _fail("give a CONFIG to start a run, or --resume RUN_DIR to continue one (not both)", code=2)
    source = resume / "config.yaml" if resume is not None else config_path
    try:
        config = load_config(source, overrides)
    except ConfigError as error:
        _fail(str(error), code=2)
    if dry_run:
        typer.echo(config.to_yaml(), nl=False)
        return
    directory = resume if resume is not None else (run_dir or Path("runs") / config.name)
    with _user_errors():
        _check_outputs(directories=[("the run directory", directory)])
    try:
        result = run_training(
            config, directory, resume=resume is not None, overwrite=overwrite, device=device.value, progress=progress
        )
    except TrainingInterrupted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(code=130) from None
    except (TrainingError, CheckpointError, RunBusyError) as error:
        _fail(str(error))
    except Exception as error:
        again = "" if resume is not None else " --overwrite"  # the failed start left its log there
        _fail_if_compile_error(error, f"run again with --set train.compile=false{again}")
        raise
    typer.echo(f"trained to step {result.step}; latest checkpoint: {result.checkpoint}")


class Sampler(str, Enum):
    ddim = "ddim"
    ddpm = "ddpm"
    dpm_solver = "dpm++2m"


class Variance(str, Enum):
    posterior = "posterior"
    beta = "beta"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


CheckpointArg = Annotated[
    Path | None,
    typer.Argument(
        metavar="[CHECKPOINT]",
        help="Checkpoint file or run directory (its latest checkpoint). Default: the newest run in runs/.",
        show_default=False,
    ),
]
StepsOpt = Annotated[
    int | None,
    typer.Option("--steps", help="Sampling steps (default: the config's sample.steps).", rich_help_panel=SAMPLER_PANEL),
]
EtaOpt = Annotated[
    float | None,
    typer.Option(
        "--eta", help="DDIM eta: 0 deterministic, 1 DDPM-like (default: config).", rich_help_panel=SAMPLER_PANEL
    ),
]
SkipOpt = Annotated[
    str | None,
    typer.Option(
        "--skip",
        help="Timestep spacing: uniform, quad, linspace, trailing, logsnr, or sections like '10,15,20'.",
        rich_help_panel=SAMPLER_PANEL,
    ),
]
InvertClassesOpt = Annotated[
    str | None,
    typer.Option(
        "--class",
        metavar="K[,K...]",
        help="The class each image shows, cycled over the images (--class 3,7: 3, 7, 3, ...); default: the null label.",
        show_default=False,
        rich_help_panel=CLASSES_PANEL,
    ),
]
ClassesOpt = Annotated[
    str | None,
    typer.Option(
        "--class",
        metavar="K[,K...]",
        help="Class labels, cycled over the images (--class 3,7: 3, 7, 3, ...). Default for a "
        "class-conditional model: each image's class is drawn from its own seed.",
        show_default=False,
        rich_help_panel=CLASSES_PANEL,
    ),
]
UnconditionalOpt = Annotated[
    bool,
    typer.Option(
        "--unconditional",
        help="Sample a class-conditional model with the null label (no class).",
        rich_help_panel=CLASSES_PANEL,
    ),
]
GuidanceOpt = Annotated[
    float,
    typer.Option(
        "--guidance",
        min=0.0,
        help="Classifier-free guidance w: eps = (1+w) eps(y) - w eps(null).",
        rich_help_panel=CLASSES_PANEL,
    ),
]
ExactOpt = Annotated[
    bool,
    typer.Option(
        "--exact",
        help="Exact inversion: solve each step by fixed-point iteration (Anderson-accelerated), decode to check "
        "the reconstruction, and solve again more tightly for any image that misses --tol; costs about 5-8x "
        "plain inversion's model calls.",
    ),
]
MaxIterOpt = Annotated[
    int, typer.Option("--max-iter", min=1, help="--exact: most fixed-point iterations per step in each pass.")
]
TolOpt = Annotated[
    float,
    typer.Option(
        "--tol",
        help="--exact: the reconstruction promised, as RMS on [-1, 1] of sampling the latent minus the image "
        "(default 1/255, half a uint8 level); an image that misses it after 4 passes is named.",
    ),
]
SampleGuidanceOpt = Annotated[
    float | None,
    typer.Option(
        "--guidance",
        min=0.0,
        help="Classifier-free guidance w: out = (1+w) out(y) - w out(null) (default: the config's sample.guidance).",
        show_default=False,
        rich_help_panel=CLASSES_PANEL,
    ),
]
GuidanceRescaleOpt = Annotated[
    float | None,
    typer.Option(
        "--guidance-rescale",
        min=0.0,
        max=1.0,
        help="Guidance rescale phi (Lin et al. 2023): scale each guided output towards the conditional one's "
        "std, which keeps many-step sampling from overexposing; null-text guidance is not rescaled "
        "(default: the config's sample.guidance_rescale).",
        show_default=False,
        rich_help_panel=CLASSES_PANEL,
    ),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Image i uses seed + i (default: config's sample.seed).")]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Images per model call.", rich_help_panel=HARDWARE_PANEL)
]
DeviceOpt = Annotated[
    Device,
    typer.Option("--device", help="Where to run; auto picks CUDA when available.", rich_help_panel=HARDWARE_PANEL),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="Model precision: fp32, bf16 autocast, or auto (bf16 on CUDA, fp32 on CPU).",
        rich_help_panel=HARDWARE_PANEL,
    ),
]
EmaOpt = Annotated[
    bool,
    typer.Option(
        "--ema/--no-ema", help="Use the EMA weights (default) or the raw ones.", rich_help_panel=HARDWARE_PANEL
    ),
]
ClipOpt = Annotated[
    bool | None,
    typer.Option(
        "--clip-x0/--no-clip-x0",
        help="Clamp predicted x_0 to [-1, 1] (default: config).",
        rich_help_panel=SAMPLER_PANEL,
    ),
]
ProgressOpt = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show a progress bar.", rich_help_panel=OUTPUT_PANEL)
]
InvertPrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="Model precision: fp32 (default here: inversion is only as exact as eps), bf16 autocast, or auto.",
        rich_help_panel=HARDWARE_PANEL,
    ),
]
CompileOpt = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the model: faster per step after a build of a minute or more "
        "(default: on for CUDA, off for CPU).",
        show_default=False,
        rich_help_panel=HARDWARE_PANEL,
    ),
]


def _auto(switch: bool | None) -> bool | str:
    """An unset --flag/--no-flag is the library's "auto"."""
    return "auto" if switch is None else switch


def _device(choice: Device) -> str:
    import torch

    if choice is Device.cuda and not torch.cuda.is_available():
        _fail("--device cuda was asked for, but CUDA is not available")
    return "cuda" if choice is Device.cuda or (choice is Device.auto and torch.cuda.is_available()) else "cpu"


def _check_outputs(files=(), directories=(), inputs=()) -> None:
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
def _user_errors():
    """Our one-line errors become ``error: ...`` and exit 1; bad option values exit 2."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.export import ExportError
    from ddim_cli.fid import FIDError
    from ddim_cli.images import ImageFileError
    from ddim_cli.outputs import OutputError

    try:
        yield
    except (CheckpointError, ImageFileError, FIDError, OutputError, ExportError) as error:
        _fail(str(error))
    except ValueError as error:  # the library's checks of steps, eta, spacing, ...
        _fail(str(error), code=2)
    except Exception as error:
        _fail_if_compile_error(error, "run again with --no-compile")
        raise


def _fail_if_compile_error(error: Exception, remedy: str) -> None:
    """torch.compile is on by default on CUDA; a machine without its toolchain (Triton, a C
    compiler) fails inside it. Say so in one line instead of dynamo's long traceback."""
    module = type(error).__module__
    if module.startswith(("torch._dynamo", "torch._inductor")):
        cause = error.__cause__ or getattr(error, "inner_exception", None) or error
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        _fail(f"torch.compile failed ({type(cause).__name__}: {first_line}); {remedy}")


def _load(checkpoint: Path | None, ema: bool, device: Device, where=None):
    """The checkpoint on ``where`` (a torch.device chosen elsewhere, e.g. this rank's GPU) or ``device``."""
    from ddim_cli.generate import load_model, resolve_checkpoint

    candidates, note = resolve_checkpoint(checkpoint)
    if note:
        typer.echo(note, err=True)
    return load_model(candidates, use_ema=ema, device=_device(device) if where is None else where)


def _spec(loaded, sampler: Sampler, steps, eta, skip, variance: Variance, clip_x0):
    from ddim_cli.generate import SamplerSpec

    cfg = loaded.config.sample
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


def _classes(text: str | None) -> list[int] | None:
    return None if text is None else _number_list(text, int, "--class")


def _labels_and_guidance(
    loaded, generators, classes: str | None, unconditional: bool, guidance: float | None, first_index: int = 0
):
    """Per-image class labels (None: the null label) of images numbered from ``first_index`` and the
    guidance w, as `sample` and `compare` choose them; an explicit --guidance that cannot apply is an
    error, the config's is dropped."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.generate import class_labels

    labels = class_labels(
        loaded, generators, classes=_classes(classes), unconditional=unconditional, first_index=first_index
    )
    if labels is None:
        if guidance:
            why = "--unconditional samples with the null label" if unconditional else "this model is unconditional"
            raise CheckpointError(f"--guidance needs class labels; {why}")
        return None, 0.0
    return labels, loaded.config.sample.guidance if guidance is None else guidance


def _rescale(loaded, option: float | None) -> float:
    """--guidance-rescale, or the config's sample.guidance_rescale."""
    return loaded.config.sample.guidance_rescale if option is None else option


def _noise_model(loaded, guidance: float, rescale_option: float | None, precision, compile_model):
    """The checkpoint's noise model as the sampling commands run it: guidance w, its rescale
    (--guidance-rescale or the config's), --precision and --compile."""
    from ddim_cli import generate as g

    return g.noise_model(
        loaded,
        guidance=guidance,
        guidance_rescale=_rescale(loaded, rescale_option),
        precision=precision.value,
        compile=_auto(compile_model),
    )


def _bar(total: int, enabled: bool, desc: str, unit: str = "img-step"):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, desc=desc, dynamic_ncols=True)


def _rank_progress(bar, shard):
    """This rank's progress counted for all ranks (they share the work evenly), up to the bar's total."""
    if bar.total is None:
        return lambda done: bar.update(done * shard.world)
    return lambda done: bar.update(min(done * shard.world, bar.total - bar.n))


@app.command(cls=_Command)
def sample(
    checkpoint: CheckpointArg = None,
    steps: StepsOpt = None,
    eta: EtaOpt = None,
    skip: SkipOpt = None,
    sampler: Annotated[
        Sampler,
        typer.Option(
            "--sampler",
            help="ddim; ddpm ancestral sampling; or dpm++2m, DPM-Solver++(2M) (logsnr spacing).",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = Sampler.ddim,
    variance: Annotated[
        Variance, typer.Option("--variance", help="DDPM variance: posterior or beta.", rich_help_panel=SAMPLER_PANEL)
    ] = (Variance.posterior),
    clip_x0: ClipOpt = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Number of images (default: config's sample.n).")] = None,
    batch_size: BatchOpt = 64,
    seed: SeedOpt = None,
    latents: Annotated[
        Path | None,
        typer.Option(
            "--latents",
            help="Start from these x_T (.npy, float32, (N, C, H, W)), from invert or --save-latents (then with the "
            "seed and classes it recorded, unless --seed, --class or --unconditional say otherwise).",
        ),
    ] = None,
    save_latents: Annotated[
        Path | None,
        typer.Option(
            "--save-latents",
            help="Write the x_T used (.npy), and beside it (FILE.json) the seed and classes: --latents FILE then "
            "gives the same images.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    null_embeddings: Annotated[
        Path | None,
        typer.Option(
            "--null-embeddings",
            help="With --latents from `ddim invert --null-text`: guide each step with its fitted null embedding "
            "(DDIM, eta 0, no clipping unless asked), which reproduces the reconstruction; the file's classes "
            "and guidance unless --class / --guidance say otherwise (another class edits the image).",
            rich_help_panel=CLASSES_PANEL,
        ),
    ] = None,
    classes: ClassesOpt = None,
    unconditional: UnconditionalOpt = False,
    guidance: SampleGuidanceOpt = None,
    guidance_rescale: GuidanceRescaleOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Grid PNG (default: in the run's samples/).", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Also write each image as its own PNG here.", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    npz: Annotated[
        Path | None,
        typer.Option(
            "--npz", help="Also write arr_0 = uint8 (N, H, W, C), for FID tools.", rich_help_panel=OUTPUT_PANEL
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="A run into --out-dir / --npz that was interrupted continues where it stopped when run again "
            "with the same options; --no-resume starts afresh.",
        ),
    ] = True,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.auto,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
    compile_model: CompileOpt = None,
) -> None:
    """Sample images from a checkpoint with DDIM, DPM-Solver++ or DDPM.

    A class-conditional model draws each image's class, uniformly, from that image's own seed (so
    every class comes about equally often and an image does not depend on the batch), guided by the
    config's sample.guidance and sample.guidance_rescale; --class picks classes, --unconditional
    uses the null label.

    Writing to --out-dir or --npz, an interrupted run continues where it stopped when the same
    command runs again. Under torchrun the ranks share every batch (--batch-size is all ranks'
    batch) and rank 0 writes: `torchrun --nproc_per_node 8 -m ddim_cli -- sample ...`.
    """
    from time import perf_counter

    import torch

    from ddim_cli import generate as g
    from ddim_cli.images import load_latents
    from ddim_cli.sample_files import SampleFiles
    from ddim_cli.seeding import seeded_noise

    if null_embeddings is not None:
        if latents is None:
            _fail("--null-embeddings needs --latents (both written by ddim invert --null-text)", code=2)
        if sampler != Sampler.ddim or eta:
            _fail("--null-embeddings were fitted for deterministic DDIM; drop --sampler / --eta", code=2)
        if unconditional:
            _fail("--null-embeddings guide towards a class; drop --unconditional", code=2)
        clip_x0 = False if clip_x0 is None else clip_x0
    with _user_errors():
        from ddim_cli import distributed

        shard, where = distributed.setup(device.value)  # one process, or one of torchrun's
        main = shard.main
        files = [("--out", out), ("--npz", npz), ("--save-latents", save_latents)]
        _check_outputs(files, [("--out-dir", out_dir)], inputs=[checkpoint, latents, null_embeddings])
        loaded = _load(checkpoint, ema, device, where)
        if out is None:
            _check_outputs(directories=[("the default --out folder", loaded.run_dir / "samples")])
        spec = _spec(loaded, sampler, steps, eta, skip, variance, clip_x0)
        shape = loaded.image_shape
        given = None if latents is None else load_latents(latents, shape)
        if given is not None and null_embeddings is None:
            seed, classes, unconditional = _recorded_draws(latents, seed, classes, unconditional, main)
        first_seed = loaded.config.sample.seed if seed is None else seed
        if given is not None and n is not None and n != len(given):
            raise ValueError(f"--n {n} does not match the {len(given)} latents in {latents}")
        count = len(given) if given is not None else (loaded.config.sample.n if n is None else n)
        steps_run = len(spec.timesteps(loaded.alpha_bars))
        name = f"sample-{spec.method}-S{spec.steps}" + (f"-eta{spec.eta:g}" if spec.method == "ddim" else "")
        grid = out or loaded.run_dir / "samples" / f"{name}-seed{first_seed}.png"
        if null_embeddings is not None:
            fitted, null_labels, w = _null_text_inputs(loaded, spec, null_embeddings, count, classes, guidance)
        else:
            w = _labels_and_guidance(loaded, seeded_noise(shape, [first_seed])[1], classes, unconditional, guidance)[1]
        phi = _rescale(loaded, guidance_rescale) if w and null_embeddings is None else 0.0
        settings = _sample_settings(
            loaded, spec, first_seed, count, classes, unconditional, (w, phi), latents, ema, precision
        )
        outputs = SampleFiles(
            grid,
            out_dir,
            npz,
            save_latents,
            count,
            shape,
            settings=settings,
            resume=resume and null_embeddings is None,  # --null-embeddings: a few images, made at once
            enabled=main,
            draws={"seed": first_seed, "classes": classes, "unconditional": unconditional},
        )
        done = shard.broadcast(outputs.done)
        if done and main:
            typer.echo(f"note: continuing an interrupted run: {done} of {count} images are done", err=True)
        label_batches, seconds = [], 0.0
        with outputs, _bar(count * steps_run, progress and main, spec.label) as bar:
            if null_embeddings is not None:
                start = perf_counter()
                images = g.sample_null_text(
                    loaded,
                    given,
                    null_labels,
                    fitted,
                    spec,
                    guidance=w,
                    batch_size=batch_size,
                    progress=_rank_progress(bar, shard),
                    shard=shard,
                )
                seconds = perf_counter() - start
                outputs.add(0, given, images)
                label_batches.append(null_labels)
            else:  # batch by batch, so that no output holds every image in memory
                make_eps = _noise_model(loaded, w, guidance_rescale, precision, compile_model)
                bar.update(done * steps_run)
                for first in range(0, count, batch_size):
                    seeds = list(range(first_seed + first, first_seed + min(count, first + batch_size)))
                    # Each seed's first draw is its x_T (or the given latent instead); its class and noise follow.
                    x_T, generators = seeded_noise(shape, seeds)
                    if given is not None:
                        x_T = given[first : first + len(seeds)]
                    labels = _labels_and_guidance(loaded, generators, classes, unconditional, guidance, first)[0]
                    label_batches.append(labels)
                    ready = max(0, min(done - first, len(seeds)))  # made by the interrupted run
                    if ready:
                        outputs.skip(first, x_T[:ready])
                    if ready == len(seeds):
                        continue
                    new = slice(ready, None)
                    images, per_image = g.generate(
                        loaded,
                        make_eps,
                        spec,
                        x_T[new],
                        generators[new],
                        labels=None if labels is None else labels[new],
                        batch_size=batch_size,
                        progress=_rank_progress(bar, shard),
                        shard=shard,
                    )
                    seconds += per_image * len(images)
                    outputs.add(first + ready, x_T[new], images)
                    bar.n = (first + len(seeds)) * steps_run  # the other ranks' share too
                    bar.refresh()
        distributed.finish(shard)
    if not main:
        return
    if label_batches[0] is None:
        conditioning = " (null label)" if loaded.config.model.num_classes else ""
    else:
        rescaled = f", rescale {phi:g}" if phi else ""
        conditioning = f" (classes {_class_summary(torch.cat(label_batches))}, guidance {w:g}{rescaled})"
    made = count - done
    timing = f" in {seconds / made:.4f} s/image" if made else ""
    typer.echo(f"{count} images with {spec.label}{conditioning} from {loaded.checkpoint}{timing}")
    typer.echo("wrote " + ", ".join(outputs.written))


def _recorded_draws(latents: Path, seed: int | None, classes: str | None, unconditional: bool, main: bool):
    """``(seed, classes, unconditional)``: what ``--save-latents`` recorded beside ``latents`` (the
    seed decides each image's class draw and sampler noise), unless --seed, --class or
    --unconditional say otherwise. Latents without a record (``ddim invert``'s) change nothing."""
    from ddim_cli.images import draws_path, load_draws

    record = load_draws(latents)
    if record is None:
        return seed, classes, unconditional
    taken = []
    if seed is None:
        seed = record["seed"]
        taken.append(f"seed {seed}")
    if classes is None and not unconditional:
        classes, unconditional = record.get("classes"), bool(record.get("unconditional"))
        taken += ["--unconditional"] if unconditional else [f"--class {classes}"] if classes else []
    if taken and main:
        typer.echo(f"note: {' and '.join(taken)} from {draws_path(latents)}, as the latents were sampled", err=True)
    return seed, classes, unconditional


def _null_text_inputs(loaded, spec, path: Path, count: int, classes: str | None, guidance: float | None):
    """The fitted embeddings of ``ddim invert --null-text``, checked against this run, with the
    labels (the file's, or --class cycled) and guidance (the file's, or --guidance) to use."""
    import torch

    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.generate import check_classes
    from ddim_cli.images import load_null_embeddings
    from ddim_cli.seeding import cycle_classes

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
    wanted_classes = _classes(classes)
    check_classes(loaded, wanted_classes or labels.tolist())
    if wanted_classes:
        labels = cycle_classes(wanted_classes, count)
    return fitted, labels, fitted_guidance if guidance is None else guidance


def _invert_labels(loaded, classes: str | None, guidance: float, count: int):
    """``--class K[,K...]`` cycled over the images to invert, or None (the null label)."""
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.generate import check_classes
    from ddim_cli.seeding import cycle_classes

    if classes is None:
        if guidance:
            raise CheckpointError("--guidance needs --class K (the null label cannot be guided)")
        return None
    wanted = _classes(classes)
    check_classes(loaded, wanted)
    return cycle_classes(wanted, count)


def _summary_of_exact_inversion(report, images: list, steps: int, tol: float, max_iter: int) -> list[str]:
    """How exact inversion kept its promise: calls per step, and every image that missed --tol."""
    calls = sum(image.model_calls for image in report) / len(report) / steps
    worst = max(image.reconstruction_rms for image in report)
    lines = [f"exact inversion: {calls:.1f} model calls per step and image on average (plain: 1), checks included"]
    missed = [(path, image) for path, image in zip(images, report, strict=True) if not image.converged]
    if not missed:
        lines[0] += f"; every image reconstructs within --tol {tol:.2g} RMS (worst {worst:.2g})"
        return lines
    lines[0] += f"; {len(missed)} of {len(report)} image(s) missed --tol {tol:.2g} RMS:"
    lines += [
        f"  {path}: reconstruction RMS {image.reconstruction_rms:.2g} after {image.rounds} passes "
        f"(--max-iter {max_iter} per step and pass: raise it, or accept this)"
        for path, image in missed
    ]
    return lines


def _sample_settings(loaded, spec, seed, count, classes, unconditional, guidance, latents, ema, precision) -> dict:
    """What decides the images of a ``ddim sample`` run: a run may continue another only if these agree.
    ``guidance`` is (w, rescale phi)."""
    from dataclasses import asdict

    made = loaded.checkpoint.stat()
    return {
        "checkpoint": str(loaded.checkpoint.resolve()),
        "checkpoint_bytes": made.st_size,
        "checkpoint_mtime_ns": made.st_mtime_ns,
        "ema": ema,
        **asdict(spec),
        "seed": seed,
        "n": count,
        "classes": classes,
        "unconditional": unconditional,
        "guidance": guidance[0],
        "guidance_rescale": guidance[1],
        "latents": None if latents is None else str(latents.resolve()),
        "precision": precision.value,
    }


def _class_summary(labels) -> str:
    counts = labels.bincount().tolist()
    return ", ".join(f"{k}: {c}" for k, c in enumerate(counts) if c)


CheckpointAndImagesArg = Annotated[
    list[Path],
    typer.Argument(
        metavar="[CHECKPOINT] IMAGE...",
        help="A checkpoint file or run directory (optional; default: the most recent run), then images.",
        show_default=False,
    ),
]


def _checkpoint_and_images(paths: list[Path], verb: str) -> tuple[Path | None, list[Path]]:
    """Split ``[CHECKPOINT] IMAGE...``: the first path is the checkpoint if it is a run directory
    or a .safetensors file."""
    checkpoint, images = (
        (paths[0], paths[1:]) if paths[0].is_dir() or paths[0].suffix == ".safetensors" else (None, paths)
    )
    if not images:
        _fail(f"give at least one image to {verb}", code=2)
    return checkpoint, images


def _load_inputs(loaded, images: list[Path]):
    """The images as the model was trained on them (channels, size, resize mode), noting changes."""
    from ddim_cli.data import resize_mode
    from ddim_cli.images import load_images

    data = loaded.config.data
    originals, notes = load_images(images, data.image_size, data.channels, resize_mode(data))
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    return originals


@app.command(cls=_Command)
def invert(
    paths: CheckpointAndImagesArg,
    steps: StepsOpt = None,
    skip: SkipOpt = None,
    class_label: InvertClassesOpt = None,
    guidance: GuidanceOpt = 0.0,
    guidance_rescale: GuidanceRescaleOpt = None,
    exact: ExactOpt = False,
    max_iter: MaxIterOpt = 10,
    tol: TolOpt = 1 / 255,  # sampling.EXACT_TOL, without importing torch for --help
    null_text: Annotated[
        bool,
        typer.Option(
            "--null-text",
            help="With --class K --guidance W: null-text inversion (Mokady et al. 2022), fitting the null "
            "label's embedding per step so that guided sampling reconstructs the image; writes "
            "null_embeddings.safetensors for `ddim sample --null-embeddings` (runs in fp32, eager).",
        ),
    ] = False,
    inner_steps: Annotated[
        int, typer.Option("--inner-steps", min=0, help="--null-text: most Adam iterations per step.")
    ] = 30,  # null_text.NULL_TEXT_INNER_STEPS
    null_lr: Annotated[
        float, typer.Option("--null-lr", min=0.0, help="--null-text: Adam learning rate on the null embedding.")
    ] = 0.1,
    early_stop: Annotated[
        float,
        typer.Option(
            "--early-stop", min=0.0, help="--null-text: a step stops once its per-dimension loss is below this."
        ),
    ] = 1e-5,
    interpolate: Annotated[
        int,
        typer.Option("--interpolate", min=0, help="With two images: decode N frames slerped between their latents."),
    ] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: the run's invert/).", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = Device.auto,
    precision: InvertPrecisionOpt = Precision.fp32,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
    compile_model: CompileOpt = None,
) -> None:
    """Invert real images to latents with deterministic DDIM, reconstruct them, and report the error.

    Plain inversion takes each step's noise where the step starts, an error of the order of the
    step; --exact solves each step for the latent that DDIM maps back exactly. Writes latents.npy
    (usable with `ddim sample --latents`), grid.png (originals, reconstructions, latents),
    metrics.csv (per-dimension MSE on [-1, 1] and PSNR) and, with --interpolate, interpolation.png.
    """
    import torch

    from ddim_cli import generate as g
    from ddim_cli.images import save_grid, save_latents, save_null_embeddings

    checkpoint, images_in = _checkpoint_and_images(paths, "invert")
    if interpolate and len(images_in) != 2:
        _fail(f"--interpolate needs exactly two images, got {len(images_in)}", code=2)
    if not tol > 0:
        _fail(f"--tol must be > 0, got {tol:g}", code=2)
    if null_text and (class_label is None or not guidance):
        _fail("--null-text needs --class K and --guidance W > 0 (unguided inversion is faithful as it is)", code=2)
    if null_text and interpolate:
        _fail("--interpolate works on plain or --exact latents; drop --null-text", code=2)
    with _user_errors():
        _check_outputs([], [("--out", out)], inputs=[checkpoint, *images_in])
        loaded = _load(checkpoint, ema, device)
        _check_outputs(directories=[("--out", out or loaded.run_dir / "invert")])
        originals = _load_inputs(loaded, images_in)
        # No clipping either way: clipping x0 while decoding would leave the ODE that inversion follows.
        spec = _spec(loaded, Sampler.ddim, steps, 0.0, skip, Variance.posterior, False)
        labels = _invert_labels(loaded, class_label, guidance, len(originals))
        make_eps = _noise_model(loaded, guidance, guidance_rescale, precision, compile_model)
        steps_run = len(spec.timesteps(loaded.alpha_bars))
        report: list = []
        fixed_point = {"exact": exact, "max_iter": max_iter, "tol": tol, "report": report}
        with _bar(2 * len(originals) * steps_run, progress, f"invert + reconstruct S={spec.steps}") as bar:
            if null_text:
                fitted = g.invert_null_text(
                    loaded,
                    originals,
                    spec,
                    labels,
                    guidance=guidance,
                    batch_size=batch_size,
                    inner_steps=inner_steps,
                    lr=null_lr,
                    early_stop=early_stop,
                    progress=bar.update,
                    **fixed_point,
                )
                latents, recon = fitted.latent, fitted.reconstruction
            else:
                latents = g.invert_images(
                    loaded,
                    make_eps,
                    originals,
                    spec,
                    labels=labels,
                    batch_size=batch_size,
                    progress=bar.update,
                    **fixed_point,
                )
                unused = [torch.Generator() for _ in latents]  # eta = 0 draws no noise
                recon, _ = g.generate(
                    loaded, make_eps, spec, latents, unused, labels=labels, batch_size=batch_size, progress=bar.update
                )
        metrics = g.reconstruction_metrics(originals, recon)

        directory = out or loaded.run_dir / "invert"
        save_latents(latents, directory / "latents.npy")
        latent_view = (latents * 0.25).clamp(-1, 1)  # N(0, 1) shown with +-4 sigma across the range
        save_grid(torch.cat([originals, recon.clamp(-1, 1), latent_view]), directory / "grid.png", nrow=len(originals))
        lines = ["image,mse,psnr_db"] + [f"{p},{m:.6g},{q:.3f}" for p, (m, q) in zip(images_in, metrics, strict=True)]
        (directory / "metrics.csv").write_text("\n".join(lines) + "\n")
        written = ["latents.npy", "grid.png", "metrics.csv"]
        if null_text:
            save_null_embeddings(
                directory / "null_embeddings.safetensors", fitted.null_embeddings, fitted.timesteps, labels, guidance
            )
            written.append("null_embeddings.safetensors")
        if interpolate:
            written.append("interpolation.png")
            alphas = torch.linspace(0, 1, interpolate)
            frames_T = g.slerp(latents[0], latents[1], alphas)
            unused = [torch.Generator() for _ in frames_T]
            frame_labels = None if labels is None else labels[:1].expand(len(frames_T))
            frames, _ = g.generate(loaded, make_eps, spec, frames_T, unused, labels=frame_labels, batch_size=batch_size)
            save_grid(frames, directory / "interpolation.png", nrow=interpolate)
    for path, (mse, psnr) in zip(images_in, metrics, strict=True):
        typer.echo(f"{path}: MSE {mse:.4g} per dimension, PSNR {psnr:.2f} dB")
    mean = sum(m for m, _ in metrics) / len(metrics)
    if exact:
        for line in _summary_of_exact_inversion(report, images_in, steps_run, tol, max_iter):
            typer.echo(line)
    if null_text:
        typer.echo(
            f"null-text inversion at guidance {guidance:g}: largest step loss {float(fitted.step_losses.max()):.3g} "
            f"(early stop {early_stop:g}); reproduce with: ddim sample {loaded.checkpoint} --latents "
            f"{directory}/latents.npy --null-embeddings {directory}/null_embeddings.safetensors --steps {spec.steps} "
            f"--skip {spec.skip} --no-clip-x0"
        )
    typer.echo(f"inverted {len(originals)} image(s) with {spec.label} from {loaded.checkpoint}; mean MSE {mean:.4g}")
    typer.echo(f"wrote {directory}/ ({', '.join(written)})")


class EditMethod(str, Enum):
    ddib = "ddib"
    sdedit = "sdedit"


@app.command(cls=_Command)
def edit(
    paths: CheckpointAndImagesArg,
    to_class: Annotated[
        int, typer.Option("--to-class", help="The class to turn every image into.", rich_help_panel=CLASSES_PANEL)
    ],
    from_class: Annotated[
        int | None,
        typer.Option(
            "--from-class",
            help="ddib: the class the images show (default: invert with the null label).",
            rich_help_panel=CLASSES_PANEL,
        ),
    ] = None,
    method: Annotated[
        EditMethod,
        typer.Option(
            "--method",
            help="ddib: invert under the source, decode under the target (Su et al. 2022); sdedit: noise to "
            "--strength x T and denoise under the target (Meng et al. 2021).",
        ),
    ] = EditMethod.ddib,
    strength: Annotated[
        float, typer.Option("--strength", help="sdedit: how far to noise, in (0, 1]; 1 is a fresh sample.")
    ] = 0.6,
    guidance: SampleGuidanceOpt = None,
    guidance_rescale: GuidanceRescaleOpt = None,
    steps: StepsOpt = None,
    skip: SkipOpt = None,
    exact_inversion: Annotated[
        bool, typer.Option("--exact/--no-exact", help="ddib: exact (fixed-point) inversion of the source.")
    ] = True,
    null_text: Annotated[
        bool,
        typer.Option(
            "--null-text",
            help="ddib: null-text inversion under --from-class at --guidance, decoding with its null embeddings.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="sdedit: image i is noised with seed + i.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: the run's edit/).", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    npz: Annotated[
        Path | None,
        typer.Option(
            "--npz",
            help="Also write arr_0 = uint8 (N, H, W, C) of the edits, in input order.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = Device.auto,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
) -> None:
    """Turn real images into another class of a class-conditional model.

    Writes grid.png (originals above edits), edited/NNNNNN.png per image and distances.csv (each
    edit's per-dimension MSE to its source on [-1, 1]). Guidance defaults to the config's
    sample.guidance. Under torchrun the ranks share every batch; rank 0 writes.
    """
    from ddim_cli import generate as g
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.images import save_grid, save_npz, save_pngs, to_uint8
    from ddim_cli.seeding import seeded_noise

    checkpoint, images_in = _checkpoint_and_images(paths, "edit")
    if method == EditMethod.sdedit and not 0 < strength <= 1:
        _fail(f"--strength must lie in (0, 1], got {strength:g}", code=2)
    if null_text and (method != EditMethod.ddib or from_class is None or guidance == 0):
        _fail("--null-text needs --method ddib, --from-class J and --guidance W > 0", code=2)
    with _user_errors():
        import torch

        from ddim_cli import distributed

        shard, where = distributed.setup(device.value)  # one process, or one of torchrun's
        _check_outputs([("--npz", npz)], [("--out", out)], inputs=[checkpoint, *images_in])
        loaded = _load(checkpoint, ema, device, where)
        _check_outputs(directories=[("--out", out or loaded.run_dir / "edit")])
        if loaded.config.model.num_classes is None:
            raise CheckpointError("--to-class needs a class-conditional model; this one is unconditional")
        num_classes = loaded.config.model.num_classes
        for option, label in (("--to-class", to_class), ("--from-class", from_class)):
            if label is not None and not 0 <= label < num_classes:
                raise CheckpointError(f"{option} {label} is out of range; this model has classes 0..{num_classes - 1}")
        w = loaded.config.sample.guidance if guidance is None else guidance
        if null_text and not w:
            raise CheckpointError("--null-text needs --guidance W > 0 (this config's sample.guidance is 0)")
        originals = _load_inputs(loaded, images_in)
        count = len(originals)
        ddib_spec = method == EditMethod.ddib
        spec = _spec(loaded, Sampler.ddim, steps, 0.0, skip, Variance.posterior, False if ddib_spec else None)
        noise = seeded_noise(loaded.image_shape, list(range(seed, seed + count)))[0]
        with _bar(count, progress and shard.main, f"edit ({method.value}) S={spec.steps}") as bar:
            edited = g.edit_images(
                loaded,
                originals,
                spec,
                torch.full((count,), to_class, dtype=torch.long),
                from_labels=None if from_class is None else torch.full((count,), from_class, dtype=torch.long),
                method=method.value,
                guidance=w,
                guidance_rescale=_rescale(loaded, guidance_rescale),
                strength=strength,
                noise=noise,
                exact=exact_inversion,
                null_text=null_text,
                batch_size=batch_size,
                progress=_rank_progress(bar, shard),
                shard=shard,
            )
        distributed.finish(shard)
        if not shard.main:  # rank 0 writes
            return
        distances = (edited.clamp(-1, 1) - originals).pow(2).flatten(1).mean(1).tolist()
        directory = out or loaded.run_dir / "edit"
        save_grid(torch.cat([originals, edited.clamp(-1, 1)]), directory / "grid.png", nrow=count)
        save_pngs(edited, directory / "edited")
        source = "null" if from_class is None else from_class
        lines = ["image,from_class,to_class,mse_to_source"] + [
            f"{p},{source},{to_class},{d:.6g}" for p, d in zip(images_in, distances, strict=True)
        ]
        (directory / "distances.csv").write_text("\n".join(lines) + "\n")
        written = [f"{directory}/ (grid.png, edited/, distances.csv)"]
        if npz is not None:
            save_npz(to_uint8(edited), npz)
            written.append(str(npz))
    how = method.value + (
        " + null-text" if null_text else " + exact inversion" if ddib_spec and exact_inversion else ""
    )
    typer.echo(
        f"edited {count} image(s) to class {to_class} with {how}, {spec.label}, guidance {w:g}"
        + (f", strength {strength:g}" if method == EditMethod.sdedit else "")
        + f"; mean MSE to source {sum(distances) / count:.4g}"
    )
    typer.echo("wrote " + ", ".join(written))


class RestoreMethod(str, Enum):
    ddnm = "ddnm"
    repaint = "repaint"


# Time travel per method (jump, resample): DDNM's authors sample without it; RePaint's paper
# resamples 10 times with jumps of 10 (over 250 steps).
_RESTORE_TRAVEL = {RestoreMethod.ddnm: (1, 1), RestoreMethod.repaint: (10, 10)}


def _check_degradation_options(mask: str | None, sr: int | None, sigma: float, gray: bool) -> None:
    """One-line errors (exit 2) for degradation options that cannot work on any model."""
    import math

    if mask is None and sr is None and not sigma and not gray:
        _fail("give a degradation to undo: --mask PRESET|FILE, --sr F, --sigma S and/or --gray", code=2)
    if not (sigma >= 0 and math.isfinite(sigma)):
        _fail(f"--sigma is a noise standard deviation on the [-1, 1] scale and must be >= 0, got {sigma:g}", code=2)
    if sr is not None and sr < 2:
        _fail(f"--sr is the downscaling factor and must be an integer >= 2, got {sr}", code=2)
    if mask is not None and sr is not None:
        _fail("--mask and --sr cannot be combined (the mask is at the model's resolution); restore in two runs", code=2)


def _degradation(loaded, mask: str | None, sr: int | None, sigma: float, gray: bool, seed: int, images: list[Path]):
    """The degradation the options describe, checked against the model (one-line errors)."""
    from ddim_cli import restoration as r
    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.generate import mask_generator
    from ddim_cli.images import image_sizes, load_mask

    channels, size, _ = loaded.image_shape
    parts = []
    if gray:
        if channels != 3:
            raise CheckpointError(f"--gray colourises RGB models; this model has {channels} channel(s)")
        parts.append(r.Colorization())
    if sr is not None:
        if size % sr:
            divisors = ", ".join(str(f) for f in range(2, size + 1) if size % f == 0)
            raise CheckpointError(f"--sr {sr} does not divide the model's resolution {size}; use one of {divisors}")
        parts.append(r.SuperResolution(sr))
    if mask is not None:
        if mask in r.MASK_PRESETS or mask.startswith("random:"):
            known = r.mask_preset(mask, size, size, mask_generator(seed))
        elif Path(mask).is_file():
            sizes = set(image_sizes(images))
            known = load_mask(Path(mask), size, sizes.pop() if len(sizes) == 1 else None)
        else:
            raise CheckpointError(
                f"--mask {mask!r} is neither a preset ({', '.join(r.MASK_PRESETS)}, random:P) nor an image file"
            )
        parts.append(r.Inpainting(known))
    if not parts:
        return r.Denoising(sigma)
    return parts[0] if len(parts) == 1 and not sigma else r.Composed(parts, sigma)


def _observations(loaded, degradation, images: list[Path], sr: int | None):
    """Degraded input images as observations ``y``: the shape A gives (e.g. H/F for --sr, one
    channel for --gray); a mask's missing pixels are zeroed whatever the file holds there."""
    import torch

    from ddim_cli.checkpoint import CheckpointError
    from ddim_cli.data import resize_mode
    from ddim_cli.images import image_sizes, load_images

    channels, size, _ = degradation.observation_shape(loaded.image_shape)
    if sr is not None:
        full = loaded.config.data.image_size
        for path, (w, h) in zip(images, image_sizes(images), strict=True):
            if (w, h) == (full, full):
                raise CheckpointError(
                    f"{path} is {w}x{h}, the model's size; with --sr {sr} the inputs are the {size}x{size} "
                    "low-resolution images (or add --degrade to give clean images)"
                )
    y, notes = load_images(images, size, channels, resize_mode(loaded.config.data))
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    observed = degradation.observed(y)
    return y if observed is None else torch.where(observed, y, torch.zeros_like(y))


@app.command(cls=_Command)
def restore(
    paths: CheckpointAndImagesArg,
    mask: Annotated[
        str | None,
        typer.Option(
            "--mask",
            metavar="PRESET|FILE",
            help="Inpainting: fill missing pixels. A PNG where white marks what to fill (the model's size or the "
            "inputs'), or bottom-half, top-half, left-half, right-half, center, random:P (a fraction P missing, "
            "drawn from --seed).",
            show_default=False,
        ),
    ] = None,
    sr: Annotated[
        int | None,
        typer.Option(
            "--sr",
            metavar="F",
            help="Super-resolution: the inputs are the images average-pooled by F.",
            show_default=False,
        ),
    ] = None,
    sigma: Annotated[
        float,
        typer.Option("--sigma", help="Denoising: Gaussian noise of this standard deviation on the [-1, 1] scale."),
    ] = 0.0,
    gray: Annotated[
        bool, typer.Option("--gray", help="Colourisation of an RGB model: the inputs are grayscale.")
    ] = False,
    degrade: Annotated[
        bool,
        typer.Option(
            "--degrade",
            help="The inputs are clean images: degrade them here (noise from --seed), restore, and report PSNR.",
        ),
    ] = False,
    method: Annotated[
        RestoreMethod,
        typer.Option(
            "--method",
            help="ddnm: range-null-space DDIM (Wang et al. 2022; DDNM+ when --sigma > 0); repaint: the observed "
            "part re-noised from the input at every step (Lugmayr et al. 2022; noiseless inputs only).",
        ),
    ] = RestoreMethod.ddnm,
    jump: Annotated[
        int | None,
        typer.Option(
            "--jump",
            min=1,
            help="Time travel: steps to go back up each time (default: ddnm 1, repaint 10).",
            show_default=False,
        ),
    ] = None,
    resample: Annotated[
        int | None,
        typer.Option(
            "--resample",
            min=1,
            help="Time travel: times each jump point is passed (1: none; default: ddnm 1, repaint 10, as in "
            "RePaint); costs about that many times the model calls.",
            show_default=False,
        ),
    ] = None,
    class_label: InvertClassesOpt = None,
    guidance: SampleGuidanceOpt = None,
    guidance_rescale: GuidanceRescaleOpt = None,
    steps: StepsOpt = None,
    eta: Annotated[
        float,
        typer.Option(
            "--eta",
            min=0.0,
            help="DDIM eta of each step: 1 (DDPM-like, as RePaint samples) measured best on the digits; 0 is "
            "deterministic.",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = 1.0,
    skip: SkipOpt = None,
    clip_x0: Annotated[
        bool,
        typer.Option(
            "--clip-x0/--no-clip-x0",
            help="Clamp predicted x_0 to [-1, 1], so that the result is the nearest image in [-1, 1] with A x = y "
            "(whatever the config's sample.clip_x0); --no-clip-x0 is the paper's unclamped projection.",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = True,
    seed: SeedOpt = None,
    n_samples: Annotated[
        int, typer.Option("--n-samples", min=1, help="Restorations per input (seeds differ), to show the uncertainty.")
    ] = 1,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: the run's restore/).", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    npz: Annotated[
        Path | None,
        typer.Option(
            "--npz",
            help="Also write arr_0 = uint8 (N x n-samples, H, W, C) of the restorations, in input order.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = Device.auto,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
) -> None:
    """Restore images with a trained model, zero-shot: inpainting, super-resolution, denoising, colourisation.

    The inputs are degraded images (for --sr F the low-resolution ones, for --gray grayscale ones),
    or clean ones with --degrade. Restoration k = i * n-samples + j (input i, sample j) starts from
    seed + k. Writes grid.png (rows: original with --degrade, degraded input, restorations),
    restored/NNNNNN.png (numbered k), and metrics.csv: PSNR against the original (--degrade), the
    degraded input's PSNR shown at full size, and the observation error, the RMS of A(x) - y over
    the observed values (~0 for noiseless inputs: known pixels are kept). Under torchrun the
    ranks share every batch; rank 0 writes.
    """
    from ddim_cli import generate as g
    from ddim_cli.images import save_grid, save_npz, save_pngs, to_uint8
    from ddim_cli.restoration import model_calls

    checkpoint, images_in = _checkpoint_and_images(paths, "restore")
    _check_degradation_options(mask, sr, sigma, gray)
    if method is RestoreMethod.repaint and sigma:
        _fail("--method repaint assumes noiseless inputs; use --method ddnm (DDNM+) with --sigma", code=2)
    default_jump, default_resample = _RESTORE_TRAVEL[method]
    jump, resample = jump or default_jump, resample or default_resample
    with _user_errors():
        import torch

        from ddim_cli import distributed

        shard, where = distributed.setup(device.value)  # one process, or one of torchrun's
        _check_outputs([("--npz", npz)], [("--out", out)], inputs=[checkpoint, *images_in])
        loaded = _load(checkpoint, ema, device, where)
        _check_outputs(directories=[("--out", out or loaded.run_dir / "restore")])
        seed = loaded.config.sample.seed if seed is None else seed
        degradation = _degradation(loaded, mask, sr, sigma, gray, seed, images_in)
        count = len(images_in)
        labels = _invert_labels(loaded, class_label, guidance or 0.0, count)
        if degrade:
            originals = _load_inputs(loaded, images_in)
            observations = g.degrade_images(degradation, originals, seed)
        else:
            originals, observations = None, _observations(loaded, degradation, images_in, sr)
        w = 0.0 if labels is None else (loaded.config.sample.guidance if guidance is None else guidance)
        spec = _spec(loaded, Sampler.ddim, steps, eta, skip, Variance.posterior, clip_x0)
        make_eps = g.noise_model(loaded, guidance=w, guidance_rescale=_rescale(loaded, guidance_rescale))
        calls = model_calls(len(spec.timesteps(loaded.alpha_bars)), jump, resample)
        with _bar(
            count * n_samples * calls, progress and shard.main, f"restore ({method.value}) S={spec.steps}"
        ) as bar:
            restored = g.restore_images(
                loaded,
                make_eps,
                observations,
                degradation,
                spec,
                labels=labels,
                seed=seed,
                samples_per_input=n_samples,
                method=method.value,
                jump=jump,
                resample=resample,
                batch_size=batch_size,
                progress=_rank_progress(bar, shard),
                shard=shard,
            ).clamp(-1, 1)
        distributed.finish(shard)
        if not shard.main:  # rank 0 writes
            return
        shown = degradation.show(observations).clamp(-1, 1)
        repeated = observations.repeat_interleave(n_samples, 0)
        errors = degradation.observation_error(restored, repeated).tolist()
        quality = [None] * len(restored)
        if originals is not None:
            quality = [q for _, q in g.reconstruction_metrics(originals.repeat_interleave(n_samples, 0), restored)]
            baseline = [q for _, q in g.reconstruction_metrics(originals, shown)]

        directory = out or loaded.run_dir / "restore"
        by_sample = restored.view(count, n_samples, *restored.shape[1:]).transpose(0, 1).reshape(restored.shape)
        rows = ([] if originals is None else [originals]) + [shown, by_sample]
        save_grid(torch.cat(rows), directory / "grid.png", nrow=count)
        save_pngs(restored, directory / "restored")
        lines = ["image,sample,psnr_db,psnr_degraded_db,observation_rmse"]
        for k, (error, psnr) in enumerate(zip(errors, quality, strict=True)):
            i, j = divmod(k, n_samples)
            scores = "," if psnr is None else f"{psnr:.3f},{baseline[i]:.3f}"
            # Six decimals on the [-1, 1] scale: far finer than a uint8 level; below that is rounding noise.
            lines.append(f"{images_in[i]},{j},{scores},{error:.6f}")
        (directory / "metrics.csv").write_text("\n".join(lines) + "\n")
        written = [f"{directory}/ (grid.png, restored/, metrics.csv)"]
        if npz is not None:
            save_npz(to_uint8(restored), npz)
            written.append(str(npz))
    how = method.value + (" (DDNM+)" if sigma and method is RestoreMethod.ddnm else "")
    travel = f", time travel jump {jump} x {resample}" if resample > 1 else ""
    typer.echo(
        f"restored {count} image(s) x {n_samples} with {how}, {spec.label}{travel}"
        + (f", class {_class_summary(labels)} guidance {w:g}" if labels is not None else "")
        + f"; observation error (RMS of A x - y) {max(errors):.3g} at most"
    )
    if originals is not None:
        typer.echo(
            f"PSNR {sum(quality) / len(quality):.2f} dB against the originals "
            f"(degraded input shown at full size: {sum(baseline) / len(baseline):.2f} dB)"
        )
    typer.echo("wrote " + ", ".join(written))


ReferenceOpt = Annotated[
    str | None,
    typer.Option(
        "--reference", help="FID reference: image folder, .npz (images or mu/sigma statistics), cifar10 or mnist."
    ),
]
InceptionOpt = Annotated[
    Path | None,
    typer.Option(
        "--inception-weights", help="Local TF-FID Inception weights (.pth); default: download once into the cache."
    ),
]
SaveStatsOpt = Annotated[
    Path | None,
    typer.Option("--save-stats", help="Write the reference statistics here (.npz).", rich_help_panel=OUTPUT_PANEL),
]
DataRootOpt = Annotated[
    Path | None, typer.Option("--data-root", help="Where a named dataset lives (default data/NAME).")
]
DownloadOpt = Annotated[bool, typer.Option("--download", help="Let torchvision download a named reference dataset.")]


def _statistics(f, opened, extract, progress, desc: str, shard=None):
    """Statistics of a source opened with ``fid.open_source`` (a statistics file is used as it is)."""
    from tqdm import tqdm

    from ddim_cli.distributed import Shard

    if isinstance(opened, dict):
        return opened
    shard = shard or Shard()
    with tqdm(disable=not progress, unit="img", desc=desc) as bar:
        return f.statistics(opened, extract, progress=_rank_progress(bar, shard), shard=shard)


def _save_stats(f, stats, path: Path | None) -> None:
    if path is not None:
        f.save_statistics(stats, path)
        typer.echo(f"wrote reference statistics to {path}", err=True)


@app.command(name="fid", cls=_Command)
def fid_command(
    samples: Annotated[str, typer.Argument(help="A folder of images or an .npz (arr_0 = uint8 (N, H, W, C)).")],
    reference: Annotated[
        str,
        typer.Argument(help="A folder, an .npz of images or of statistics (mu, sigma), or cifar10 / mnist (train)."),
    ],
    save_stats: SaveStatsOpt = None,
    inception_weights: InceptionOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchOpt = 100,
    device: DeviceOpt = Device.auto,
    progress: ProgressOpt = True,
) -> None:
    """Frechet Inception Distance between samples and a reference (torch-fidelity, TF-compatible)."""
    from ddim_cli import fid as f

    with _user_errors():
        _check_outputs([("--save-stats", save_stats)], inputs=[Path(samples), Path(reference)])
    try:  # both inputs are checked before the Inception weights are fetched
        opened_samples = f.open_source(samples, batch_size)
        opened_reference = f.open_source(reference, batch_size, data_root=data_root, download=download)
        extract = f.inception_extractor(inception_weights, _device(device))
        reference_stats = _statistics(f, opened_reference, extract, progress, "reference statistics")
        _save_stats(f, reference_stats, save_stats)
        sample_stats = _statistics(f, opened_samples, extract, progress, "sample statistics")
        value = f.frechet_distance(sample_stats, reference_stats)
    except f.FIDError as error:
        _fail(str(error))
    typer.echo(f"FID {value:.4f} ({int(sample_stats['count'])} samples vs {reference})")


def _number_list(text: str, kind: type, option: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail(f"{option} takes comma-separated numbers, got {text!r}", code=2)
    if not values:
        _fail(f"{option} needs at least one value", code=2)
    return values


@app.command(cls=_Command)
def compare(
    checkpoint: CheckpointArg = None,
    steps: Annotated[
        str, typer.Option("--steps", help="Comma-separated DDIM step counts.", rich_help_panel=SAMPLER_PANEL)
    ] = "10,20,50,100",
    eta: Annotated[
        str, typer.Option("--eta", help="Comma-separated DDIM etas.", rich_help_panel=SAMPLER_PANEL)
    ] = "0,0.5,1",
    skip: SkipOpt = None,
    ddpm_reference: Annotated[
        bool,
        typer.Option(
            "--ddpm-reference/--no-ddpm-reference",
            help="Add DDPM over all T steps as a reference row.",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = True,
    dpm_solver: Annotated[
        bool,
        typer.Option(
            "--dpm-solver/--no-dpm-solver",
            help="Add DPM-Solver++(2M) rows (logsnr spacing) per step count.",
            rich_help_panel=SAMPLER_PANEL,
        ),
    ] = True,
    clip_x0: ClipOpt = None,
    classes: ClassesOpt = None,
    unconditional: UnconditionalOpt = False,
    guidance: SampleGuidanceOpt = None,
    guidance_rescale: GuidanceRescaleOpt = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Images per row.")] = 8,
    seed: SeedOpt = None,
    batch_size: BatchOpt = 64,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: the run's compare/).", rich_help_panel=OUTPUT_PANEL),
    ] = None,
    fid: Annotated[
        int,
        typer.Option("--fid", min=0, help="Also compute FID from N samples per row (kept and reused in OUT/samples)."),
    ] = 0,
    reference: ReferenceOpt = None,
    inception_weights: InceptionOpt = None,
    save_stats: SaveStatsOpt = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.auto,
    ema: EmaOpt = True,
    progress: ProgressOpt = True,
    compile_model: CompileOpt = None,
) -> None:
    """Run DDIM at several steps and etas, and DDPM, from the same noise; write a grid, a table and plots.

    With --fid N --reference REF, every row also gets its FID over N samples, and, for the
    cifar10/celeba presets, the DDIM paper's Table 1 value beside it. Under torchrun
    (`torchrun --nproc_per_node N -m ddim_cli -- compare ...`) the ranks share every batch and
    the FID features; rank 0 writes.
    """
    from ddim_cli import compare as c
    from ddim_cli.seeding import seeded_noise

    step_counts = _number_list(steps, int, "--steps")
    etas = _number_list(eta, float, "--eta")
    if fid and reference is None:
        _fail("--fid needs --reference (a folder, an .npz of images or statistics, or cifar10/mnist)", code=2)
    with _user_errors():
        from ddim_cli import distributed

        shard, where = distributed.setup(device.value)  # one process, or one of torchrun's
        _check_outputs([("--save-stats", save_stats)], [("--out", out)], inputs=[checkpoint])
        loaded = _load(checkpoint, ema, device, where)
        _check_outputs(directories=[("--out", out or loaded.run_dir / "compare")])
        cfg = loaded.config
        specs = c.comparison_specs(
            step_counts,
            etas,
            skip=cfg.sample.skip if skip is None else skip,
            clip_x0=cfg.sample.clip_x0 if clip_x0 is None else clip_x0,
            ddpm_reference=cfg.diffusion.num_timesteps if ddpm_reference else None,
            dpm_solver=dpm_solver,
        )
        for spec in specs:
            spec.check(loaded.alpha_bars)
        # Checked on the first images; every row and batch draws its classes the same way.
        first_seed = cfg.sample.seed if seed is None else seed
        _, w = _labels_and_guidance(
            loaded, seeded_noise(loaded.image_shape, [first_seed])[1], classes, unconditional, guidance
        )
        make_eps = _noise_model(loaded, w, guidance_rescale, precision, compile_model)
        directory = out or loaded.run_dir / "compare"
        samples_dir = directory / "samples" if fid else None
        extract = _reference = None
        if fid:
            from ddim_cli import fid as f

            with shard.main_first():  # one download of the reference or the weights
                opened_reference = f.open_source(reference, batch_size, data_root=data_root, download=download)
                extract = f.inception_extractor(inception_weights, where)
            _reference = _statistics(
                f, opened_reference, extract, progress and shard.main, "reference statistics", shard
            )
            if shard.main:
                _save_stats(f, _reference, save_stats)
        per_row = max(n, fid)
        total = per_row * sum(len(spec.timesteps(loaded.alpha_bars)) for spec in specs)
        with _bar(total, progress and shard.main, f"compare {len(specs)} samplers") as bar:
            rows = c.run_comparison(
                loaded,
                make_eps,
                specs,
                n=n,
                seed=first_seed,
                batch_size=batch_size,
                progress=_rank_progress(bar, shard),
                samples_dir=samples_dir,
                count=fid or None,
                classes=_classes(classes),
                unconditional=unconditional,
                shard=shard,
            )
        if fid:
            with _bar(fid * len(rows), progress and shard.main, "sample statistics", unit="img") as bar:
                c.add_fid(
                    rows, samples_dir, _reference, extract, batch_size, cfg.name, shard, _rank_progress(bar, shard)
                )
        distributed.finish(shard)
        if not shard.main:  # rank 0 writes
            return
        paths = c.write_comparison(rows, directory)
    typer.echo(paths["table.md"].read_text(), nl=False)
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


class Preset(str, Enum):
    cifar10 = "cifar10"
    celeba = "celeba"
    lsun_bedroom = "lsun-bedroom"
    lsun_church = "lsun-church"
    lsun_cat = "lsun-cat"


@app.command(cls=_Command)
def convert(
    source: Annotated[
        Path,
        typer.Argument(
            help="Original DDPM weights (.ckpt/.pth/.safetensors state dict, as used by the DDIM code) "
            "or a diffusers UNet2DModel directory (config.json + weights, or a pipeline with unet/).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="The checkpoint to write (.safetensors).", show_default=False, rich_help_panel=OUTPUT_PANEL
        ),
    ],
    preset: Annotated[
        Preset | None,
        typer.Option("--preset", help="Architecture of an original-layout file (the DDIM code's configs)."),
    ] = None,
    config_path: Annotated[
        Path | None, typer.Option("--config", help="Or a YAML config giving that architecture and schedule.")
    ] = None,
) -> None:
    """Convert published DDPM weights into a ddim-cli checkpoint (no code is unpickled)."""
    from ddim_cli.config import ConfigError, load_config
    from ddim_cli.convert import ConversionError
    from ddim_cli.convert import convert as run_conversion

    with _user_errors():
        _check_outputs([("--out", out)], inputs=[source])
    try:
        config = load_config(config_path) if config_path is not None else None
        written = run_conversion(source, out, preset=preset.value if preset else None, config=config)
    except ConfigError as error:
        _fail(str(error), code=2)
    except ConversionError as error:
        _fail(str(error))
    typer.echo(f"wrote {written}; sample it with: ddim sample {written}")


class ExportFormat(str, Enum):
    diffusers = "diffusers"


@app.command(cls=_Command)
def export(
    checkpoint: CheckpointArg = None,
    out: Annotated[
        Path, typer.Option("--out", help="The folder to write.", show_default=False, rich_help_panel=OUTPUT_PANEL)
    ] = ...,
    export_format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="diffusers: a save_pretrained layout (unet/, scheduler/, model_index.json) that "
            "DDIMPipeline.from_pretrained loads.",
        ),
    ] = ExportFormat.diffusers,
    ema: EmaOpt = True,
) -> None:
    """Export a checkpoint for other tools (diffusers: UNet2DModel + DDIMScheduler)."""
    from ddim_cli.export import export_diffusers

    with _user_errors():
        _check_outputs(directories=[("--out", out)], inputs=[checkpoint])
        loaded = _load(checkpoint, ema, Device.cpu)
        written = export_diffusers(loaded.config, loaded.model.state_dict(), out)
    typer.echo(
        f"exported {loaded.checkpoint} ({'EMA' if ema else 'raw'} weights) to {out}/ ({len(written)} files); "
        f"load it with DDIMPipeline.from_pretrained({str(out)!r})"
    )


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


def main() -> None:
    warnings.showwarning = _one_line_warning
    if hasattr(signal, "SIGPIPE"):
        # A reader that closed the pipe (`ddim sample --help | head`) ends the command quietly, as it
        # ends other Unix tools, instead of an "error: Broken pipe". That stop is no worse than kill -9,
        # which training and sampling runs are built to survive (their --resume).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    app()
