"""Option types, choices and --help panels shared by the commands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

# Each command's --help groups its options: its own in "Options", then these shared panels.
SAMPLER_PANEL = "Sampler"
CLASSES_PANEL = "Classes and guidance"
OUTPUT_PANEL = "Outputs"
HARDWARE_PANEL = "Hardware and speed"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


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
    tf32 = "tf32"
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
        show_default=False,
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
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads (default: as many as the job's batches can use, at most the cores other processes "
        "leave free; OMP_NUM_THREADS also counts).",
        rich_help_panel=HARDWARE_PANEL,
    ),
]
RunThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads (train.threads; default: every core, however busy, so that a resume repeats the "
        "run's arithmetic; OMP_NUM_THREADS also counts).",
        rich_help_panel=HARDWARE_PANEL,
    ),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="Model precision: fp32 (IEEE, also on CUDA), tf32 (fp32 with TF32 matmuls and convolutions on CUDA), "
        "bf16 autocast, or auto (bf16 on CUDA, fp32 on CPU).",
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
        help="Model precision: fp32 (default here: inversion is only as exact as eps), tf32, bf16 autocast, or auto.",
        rich_help_panel=HARDWARE_PANEL,
    ),
]
CompileOpt = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the model: faster per step after a build of up to a minute, cached for later runs "
        "(default: on CUDA for jobs big enough to repay the build, off on CPU).",
        show_default=False,
        rich_help_panel=HARDWARE_PANEL,
    ),
]


CheckpointAndImagesArg = Annotated[
    list[Path],
    typer.Argument(
        metavar="[CHECKPOINT] IMAGE...",
        help="A checkpoint file or run directory (optional; default: the most recent run), then images.",
        show_default=False,
    ),
]


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


def out_folder_option(default_folder: str):
    """``--out DIR`` of a command that writes a folder, by default ``default_folder`` in the run."""
    return Annotated[
        Path | None,
        typer.Option(
            "--out", help=f"Output folder (default: the run's {default_folder}/).", rich_help_panel=OUTPUT_PANEL
        ),
    ]


def npz_option(what: str, shape: str = "N, H, W, C"):
    """``--npz FILE``: ``what`` also as one uint8 array, for FID tools and other programs."""
    return Annotated[
        Path | None,
        typer.Option(
            "--npz", help=f"Also write this .npz: arr_0 = uint8 ({shape}) of {what}.", rich_help_panel=OUTPUT_PANEL
        ),
    ]


def overrides_option(example: str):
    """``--set KEY=VALUE`` (repeatable) of the commands that build a run's config."""
    return Annotated[
        list[str],
        typer.Option("--set", metavar="KEY=VALUE", help=f"Override a config key, e.g. {example}. Repeatable."),
    ]


TimeLimitOpt = Annotated[
    str | None,
    typer.Option(
        "--time-limit",
        metavar="DURATION",
        help="Stop cleanly (checkpoint, exit 124) before this much wall time: 3600, 90m, 4h or 04:00:00 "
        "(train.time_limit; SLURM's job end time counts too).",
    ),
]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(
        "--resume",
        metavar="RUN_DIR",
        help="Continue the run in RUN_DIR from its latest checkpoint (with its own config and these --set).",
    ),
]
ResumeIfExistsOpt = Annotated[
    bool,
    typer.Option(
        "--resume-if-exists",
        help="Continue the run in its directory if it holds one, else start it: one line for a batch script's "
        "first start and every requeue.",
    ),
]


def with_run_options(overrides: list[str], time_limit: str | None, threads: int | None = None) -> list[str]:
    """--time-limit is train.time_limit, --threads train.threads."""
    if time_limit is not None:
        overrides = [*overrides, f"train.time_limit={time_limit}"]
    return overrides if threads is None else [*overrides, f"train.threads={threads}"]
