"""Run configuration: YAML with sections ``data``, ``model``, ``diffusion``, ``train``, ``sample``.

The file is read with ``yaml.safe_load`` into the dataclasses below; ``--set section.key=value``
overrides are parsed as YAML values and checked against the field's type. Every problem is a
:class:`ConfigError` with a one-line message that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ddim_cli.schedule import SCHEDULE_KINDS, SPACINGS, alpha_bars, rescale_zero_terminal_snr
from ddim_cli.unet import UNetConfig, check_config


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


@dataclass
class DataConfig:
    dataset: Literal["digits", "cifar10", "mnist", "folder"] = "digits"  # what to train on
    root: str = "data"  # where torchvision datasets live (or the image folder for `folder`)
    download: bool = False  # let torchvision download cifar10/mnist into `root`
    image_size: int = 16  # images are resized to image_size x image_size
    # How images are resized: nearest, bilinear or bicubic; auto is bilinear for digits, bicubic otherwise.
    interpolation: Literal["auto", "nearest", "bilinear", "bicubic"] = "auto"
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    random_flip: bool = False  # random horizontal flips during training
    strict: bool = False  # folder: fail on an unreadable file instead of skipping it
    num_workers: int = 0  # DataLoader worker processes (and decoding for on_device)
    # Hold the decoded dataset on the training device and batch it there (no workers, no copies);
    # auto: when it takes at most 2 GiB (and a quarter of the free GPU memory).
    on_device: Literal["auto", True, False] = "auto"


@dataclass
class ModelConfig:
    ch: int = 32  # base channel count (multiple of 32)
    ch_mult: tuple[int, ...] = (1, 2, 2)  # channel multiplier per resolution level
    num_res_blocks: int = 2  # ResNet blocks per level
    attn_resolutions: tuple[int, ...] = (8,)  # feature-map sizes with self-attention
    dropout: float = 0.1  # dropout in ResNet blocks
    resamp_with_conv: bool = True  # learned convs in down/upsampling
    num_classes: int | None = None  # class-conditional (classifier-free guidance) with this many classes
    patch_size: int = 1  # pixels per side folded into channels: the U-Net runs at image_size / patch_size
    prediction: Literal["eps", "x0", "v"] = "eps"  # what the network outputs: noise, data, or v (Salimans & Ho)


@dataclass
class DiffusionConfig:
    schedule: Literal["linear", "cosine", "quadratic", "sigmoid"] = "linear"  # noise schedule kind
    num_timesteps: int = 1000  # T, the number of training timesteps
    beta_start: float = 1e-4  # first beta (linear, quadratic, sigmoid)
    beta_end: float = 0.02  # last beta (linear, quadratic, sigmoid)
    rescale_zero_terminal_snr: bool = False  # Lin et al. 2023: alpha_bar[T-1] = 0 (needs x0 or v prediction)


@dataclass
class TrainConfig:
    steps: int = 5000  # optimizer steps to train for
    batch_size: int = 64  # global batch (split evenly across ranks)
    lr: float = 2e-4  # peak learning rate
    warmup: int = 0  # linear learning-rate warmup steps
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup: constant, or cosine decay to 0
    optimizer: Literal["adam", "adamw"] = "adam"  # Adam as in DDPM, or AdamW
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)
    ema_decay: float = 0.9999  # EMA of the weights, used for sampling
    label_dropout: float = 0.0  # drop class labels to the null label with this probability
    loss_weighting: Literal["none", "min_snr"] = "none"  # per-timestep MSE weights: none, or Min-SNR-gamma
    min_snr_gamma: float = 5.0  # gamma of Min-SNR-gamma weighting (Hang et al. 2023)
    seed: int = 0  # seeds data order, noise, timesteps, augmentation and dropout
    # bf16 autocast, fp32 with TF32 matmuls on CUDA, or IEEE fp32; auto: bf16 on CUDA, fp32 on CPU
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    compile: Literal["auto", True, False] = "auto"  # torch.compile the model; auto: on CUDA for runs that repay it
    log_every: int = 50  # steps between metrics.jsonl lines
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    sample_every: int = 1000  # steps between EMA sample grids (0 disables)
    fid_every: int = 0  # steps between FIDs of EMA samples against the training set (0 disables)
    fid_samples: int = 1000  # samples per FID during training (sample.steps DDIM steps each)
    tensorboard: bool = False  # also log metrics and sample grids to RUN_DIR/tensorboard (needs tensorboard)
    keep_checkpoints: int = 3  # how many recent checkpoints to keep
    # Stop cleanly (checkpoint, exit 124) before this much wall time: 3600, 90m, 4h or 04:00:00
    # ("" none; SLURM's job end time also counts when the job has one).
    time_limit: str = ""
    requeue: bool = False  # on SIGUSR1 (SLURM's warning before the limit): checkpoint, then scontrol requeue
    threads: int = 0  # CPU threads (0: every core other processes leave free; OMP_NUM_THREADS also counts)


@dataclass
class SampleConfig:
    steps: int = 50  # DDIM steps for grids made during training (and `ddim sample` defaults)
    eta: float = 0.0  # DDIM eta
    skip: str = "uniform"  # timestep spacing: uniform, quad, linspace, trailing or sections
    n: int = 64  # images in a grid
    seed: int = 0  # image i uses seed + i
    clip_x0: bool = True  # clamp predicted x_0 to [-1, 1]
    guidance: float = 0.0  # classifier-free guidance w for class-conditional sampling (0: the plain conditional model)
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023: guided output rescaled towards the conditional one's std


@dataclass
class DistillConfig:
    """How a student was (or is being) distilled from its teacher (``ddim distill``)."""

    method: Literal["progressive", "consistency", "dmd"] = (
        "consistency"  # Salimans & Ho 2022, Song et al. 2023, Yin et al. 2024
    )
    teacher: str = ""  # the teacher's checkpoint file
    # progressive: the first teacher's DDIM steps (trailing grid from t = T-1); dmd: the regression pairs'
    # DPM-Solver++(2M) steps
    teacher_steps: int = 16
    steps: int = 4  # the student's sampling steps (progressive: the last round's)
    round_steps: int = 600  # optimizer steps per halving round (consistency, dmd: in all)
    lr: float = 5e-4  # peak learning rate after warmup (consistency: 2e-4 by default)
    warmup: int = 20  # linear learning-rate warmup steps of each round
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup: constant, or cosine to 0 at the round end
    ema_decay: float = 0.99  # EMA of the student's weights, the weights kept (and the next round's teacher)
    weighting: Literal["truncated_snr", "none"] = "truncated_snr"  # progressive: max(SNR, 1), or plain x-MSE
    guidance: float = 0.0  # the teacher's classifier-free guidance the student learns (one call per step)
    guidance_rescale: float = 0.0  # and its rescale phi
    grid_points: int = 32  # consistency: the discretisation's points (lcm spacing, plus t = 0)
    skip_points: int = 1  # consistency: teacher DDIM step over this many grid intervals (LCM's skipping)
    target_ema: float = 0.95  # consistency: EMA decay of the target network (mu of Song et al. 2023)
    fake_updates: int = 4  # dmd: fake-score updates per generator update (DMD2's two time-scale rule)
    fake_lr: float = 0.0  # dmd: the fake score's learning rate (0: distill.lr)
    # dmd: generator samples per fake-score update (at most the batch), cut at random from one batch drawn
    # per step (0: each update draws its own batch)
    fake_batch: int = 0
    regression_weight: float = 2.0  # dmd: weight of the regression loss on teacher ODE pairs (0: off)
    regression_pairs: int = 1024  # dmd: teacher ODE pairs (noise -> its ODE solution), drawn once
    # dmd: the regression weight over the run: constant, or a cosine decay to 0 at the run's end (the
    # distribution-matching gradient alone at the end, as DMD2 trains throughout)
    regression_schedule: Literal["constant", "cosine"] = "constant"
    gan_weight: float = 0.0  # dmd: weight of DMD2's GAN term on real images (0: off)
    min_level: float = 0.02  # dmd: the distribution-matching timesteps are uniform in [min, max] of T
    max_level: float = 0.98

    @property
    def sampler(self) -> str:
        """How its students sample: DDIM steps (progressive), or the multistep consistency chain of
        CM Algorithm 1 (consistency and dmd: x = f(x_T, T), then re-noised and f again)."""
        return "ddim" if self.method == "progressive" else "consistency"

    @property
    def grid_size(self) -> int:
        """The points of the grid its students learned, whose sub-grids they sample: consistency's
        ``grid_points``, a dmd student's own ``steps`` (progressive students: unused)."""
        return self.steps if self.method == "dmd" else self.grid_points

    @property
    def spacing(self) -> str:
        """The timesteps its students sample: PD's trailing grid, or (consistency, dmd) the grid that
        diffusers' LCMScheduler steps (:func:`~ddim_cli.schedule.timesteps`)."""
        return "trailing" if self.method == "progressive" else "lcm"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    name: str = "run"  # the run's name (defaults to the config file's stem)
    distill: DistillConfig | None = None  # set for a distilled student (ddim distill)

    def unet_config(self) -> UNetConfig:
        network = {k: v for k, v in dataclasses.asdict(self.model).items() if k != "prediction"}
        return UNetConfig(**network, in_channels=self.data.channels, resolution=self.data.image_size)

    def schedule_params(self) -> dict[str, float]:
        if self.diffusion.schedule == "cosine":
            return {}
        return {"beta_start": self.diffusion.beta_start, "beta_end": self.diffusion.beta_end}

    def alpha_bars(self) -> torch.Tensor:
        """The model's float64 ``alpha_bar`` table, zero-terminal-SNR rescaled if configured."""
        d = self.diffusion
        table = alpha_bars(d.schedule, d.num_timesteps, **self.schedule_params())
        return rescale_zero_terminal_snr(table) if d.rescale_zero_terminal_snr else table

    def to_dict(self) -> dict[str, Any]:
        plain = _plain(dataclasses.asdict(self))
        if plain["distill"] is None:  # a teacher's config reads as it always did
            del plain["distill"]
        return plain

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file and apply ``section.key=value`` overrides."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:  # a binary file, or a text file in another encoding
        raise ConfigError(f"config {path} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, overrides)


# What a resumed run's overrides may not change: the network (its dropout aside, a training
# setting), its noise schedule and target, the image shape, and what a student is distilled from
# and into. The weights were trained for these.
_FIXED_ON_RESUME = {
    "model": tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "dropout"),
    "diffusion": tuple(f.name for f in dataclasses.fields(DiffusionConfig)),
    "data": ("image_size", "channels"),
    "distill": ("method", "teacher", "steps", "teacher_steps", "grid_points"),
}


def resume_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run's own config (its ``config.yaml``) with ``overrides``, which may change how the run
    goes on (``train.steps``, logging, data loading...) but not what its weights are: setting a key
    of ``_FIXED_ON_RESUME`` to another value is a ConfigError (its own value, as a requeued job's
    command repeats it, is fine)."""
    saved = load_config(path)
    config = config_from_dict(saved.to_dict(), overrides)
    for section, keys in _FIXED_ON_RESUME.items():
        before, after = getattr(saved, section), getattr(config, section)
        if before is None or after is None:
            continue
        for key in keys:
            if getattr(before, key) != getattr(after, key):
                raise ConfigError(
                    f"{section}.{key} cannot change when a run is resumed ({getattr(before, key)!r} -> "
                    f"{getattr(after, key)!r}): its weights were trained for the first; start a new run to change it"
                )
    return config


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate a :class:`Config` from nested dicts (e.g. the copy inside a checkpoint)."""
    config = _build(Config, raw, "")
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


def apply_override(config: Config, override: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    target: Any = config
    for depth, part in enumerate(parents):
        _check_key(type(target), part, ".".join(parents[:depth]))
        target = getattr(target, part)
    if target is None:
        raise ConfigError(f"{key}: this config has no {'.'.join(parents)} section (only ddim distill runs do)")
    if not dataclasses.is_dataclass(target):
        raise ConfigError(f"{key}: {'.'.join(parents)} is not a section")
    _check_key(type(target), leaf, ".".join(parents))
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    hints = typing.get_type_hints(type(target))
    if dataclasses.is_dataclass(_unwrap(hints[leaf])):
        raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{_field_names(hints[leaf])[0]}")
    setattr(target, leaf, _coerce(value, hints[leaf], key))


def validate(config: Config) -> None:
    """Checks that need more than one field's type."""

    def need(condition: bool, key: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{key}: {message}")

    d, t, s, m = config.data, config.train, config.sample, config.model
    need(d.image_size >= 1, "data.image_size", f"must be >= 1, got {d.image_size}")
    need(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels}")
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    need(config.diffusion.num_timesteps >= 1, "diffusion.num_timesteps", "must be >= 1")
    need(
        0 < config.diffusion.beta_start <= config.diffusion.beta_end < 1,
        "diffusion.beta_start",
        "needs 0 < beta_start <= beta_end < 1",
    )
    for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        need(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    need(t.sample_every >= 0, "train.sample_every", "must be >= 0 (0 disables)")
    need(t.threads >= 0, "train.threads", f"must be >= 0 (0: auto), got {t.threads}")
    if t.time_limit:
        from ddim_cli.stopping import parse_duration

        try:
            seconds = parse_duration(t.time_limit)
        except ValueError as error:
            raise ConfigError(f"train.time_limit: {error}") from None
        need(seconds > 0, "train.time_limit", f"must be more than 0, got {t.time_limit!r}")
    need(t.fid_every >= 0, "train.fid_every", "must be >= 0 (0 disables)")
    need(t.fid_samples >= 2, "train.fid_samples", f"must be >= 2, got {t.fid_samples}")
    need(t.min_snr_gamma > 0, "train.min_snr_gamma", f"must be > 0, got {t.min_snr_gamma}")
    need(
        not config.diffusion.rescale_zero_terminal_snr or m.prediction in ("x0", "v"),
        "diffusion.rescale_zero_terminal_snr",
        "needs model.prediction v or x0 (an eps model cannot recover x0 from pure noise)",
    )
    need(
        not config.diffusion.rescale_zero_terminal_snr or config.diffusion.num_timesteps >= 2,
        "diffusion.rescale_zero_terminal_snr",
        "needs diffusion.num_timesteps >= 2",
    )
    need(t.warmup >= 0, "train.warmup", "must be >= 0")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    need(0 <= t.label_dropout < 1, "train.label_dropout", f"must be in [0, 1), got {t.label_dropout}")
    need(
        t.label_dropout == 0 or m.num_classes is not None,
        "train.label_dropout",
        "needs a class-conditional model (set model.num_classes)",
    )
    need(
        1 <= s.steps <= config.diffusion.num_timesteps,
        "sample.steps",
        f"must be from 1 to diffusion.num_timesteps={config.diffusion.num_timesteps}, got {s.steps}",
    )
    need(s.eta >= 0, "sample.eta", f"must be >= 0, got {s.eta}")
    need(s.guidance >= 0, "sample.guidance", f"must be >= 0, got {s.guidance}")
    need(
        s.guidance == 0 or m.num_classes is not None,
        "sample.guidance",
        "needs a class-conditional model (set model.num_classes)",
    )
    need(0 <= s.guidance_rescale <= 1, "sample.guidance_rescale", f"must be in [0, 1], got {s.guidance_rescale}")
    need(s.n >= 1, "sample.n", f"must be >= 1, got {s.n}")
    need(
        s.skip in SPACINGS or "," in s.skip or s.skip.startswith("ddim") or s.skip.isdigit(),
        "sample.skip",
        f"must be one of {', '.join(SPACINGS)}, a section list like '10,15,20' or 'ddimN', got {s.skip!r}",
    )
    need(config.diffusion.schedule in SCHEDULE_KINDS, "diffusion.schedule", "unknown schedule")
    if config.distill is not None:
        _validate_distill(config, need)
    levels = len(m.ch_mult) - 1
    # A bad patch_size itself is check_config's to report; here it only scales the divisor.
    patch = m.patch_size if isinstance(m.patch_size, int) and m.patch_size >= 1 else 1
    patched = "" if patch == 1 else f"{patch} * "
    need(
        d.image_size % (patch * 2**levels) == 0,
        "data.image_size",
        f"{d.image_size} must be divisible by {patched}2**{levels} for "
        + (f"model.patch_size {patch} and " if patch > 1 else "")
        + f"model.ch_mult of {len(m.ch_mult)} levels",
    )
    try:
        check_config(config.unet_config())
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _validate_distill(config: Config, need) -> None:
    x = config.distill
    for key in ("teacher_steps", "steps", "round_steps", "grid_points", "skip_points"):
        need(getattr(x, key) >= 1, f"distill.{key}", f"must be >= 1, got {getattr(x, key)}")
    need(x.lr > 0, "distill.lr", f"must be > 0, got {x.lr}")
    need(x.warmup >= 0, "distill.warmup", "must be >= 0")
    for key in ("ema_decay", "target_ema"):
        need(0 <= getattr(x, key) < 1, f"distill.{key}", f"must be in [0, 1), got {getattr(x, key)}")
    need(x.fake_updates >= 1, "distill.fake_updates", f"must be >= 1, got {x.fake_updates}")
    need(x.regression_pairs >= 1, "distill.regression_pairs", f"must be >= 1, got {x.regression_pairs}")
    need(x.fake_batch >= 0, "distill.fake_batch", f"must be >= 0, got {x.fake_batch}")
    for key in ("fake_lr", "regression_weight", "gan_weight"):
        need(getattr(x, key) >= 0, f"distill.{key}", f"must be >= 0, got {getattr(x, key)}")
    need(
        0 <= x.min_level < x.max_level <= 1,
        "distill.min_level",
        f"must be below distill.max_level ({x.max_level}), both in [0, 1], got {x.min_level}",
    )
    need(x.guidance >= 0, "distill.guidance", f"must be >= 0, got {x.guidance}")
    need(0 <= x.guidance_rescale <= 1, "distill.guidance_rescale", f"must be in [0, 1], got {x.guidance_rescale}")
    need(
        x.guidance == 0 or config.model.num_classes is not None,
        "distill.guidance",
        "needs a class-conditional teacher (this one is unconditional)",
    )
    need(
        x.steps <= x.teacher_steps <= config.diffusion.num_timesteps,
        "distill.teacher_steps",
        f"must lie between distill.steps ({x.steps}) and diffusion.num_timesteps "
        f"({config.diffusion.num_timesteps}), got {x.teacher_steps}",
    )
    need(
        (x.method != "consistency" or x.skip_points < x.grid_points)
        and x.grid_points <= config.diffusion.num_timesteps,
        "distill.grid_points",
        f"must exceed distill.skip_points ({x.skip_points}) and be at most diffusion.num_timesteps, "
        f"got {x.grid_points}",
    )


# --- building dataclasses from plain data --------------------------------------------------------
def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        _check_key(cls, str(key), prefix)
        dotted = f"{prefix}.{key}" if prefix else str(key)
        kind = _unwrap(hints[key])
        values[key] = (
            _build(kind, value, dotted) if dataclasses.is_dataclass(kind) else _coerce(value, hints[key], dotted)
        )
    return cls(**values)


def _check_key(cls: type, key: str, prefix: str) -> None:
    names = _field_names(cls)
    if key not in names:
        dotted = f"{prefix}.{key}" if prefix else key
        valid = [f"{prefix}.{n}" if prefix else n for n in names]
        close = difflib.get_close_matches(dotted, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(valid)})"
        raise ConfigError(f"unknown key {dotted!r}{hint}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unwrap(kind: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if _is_union(kind) and len(args) == 1:
        return args[0]
    return kind


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    if _is_union(kind):
        if value is None and type(None) in typing.get_args(kind):
            return None
        return _coerce(value, _unwrap(kind), key)
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if not any(value == c and type(value) is type(c) for c in choices):  # 1 is not True here
            shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
            raise ConfigError(f"{key}: expected one of {shown}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_kind = typing.get_args(kind)[0]
        return tuple(_coerce(item, item_kind, f"{key}[{i}]") for i, item in enumerate(value))
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; every user means the number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf and .nan, or 1e999; no setting means either
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if isinstance(value, bool) or value is None or isinstance(value, list | dict):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {kind!r} for {key}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
