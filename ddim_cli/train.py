"""The DDPM training loop (Ho et al. 2020, Algorithm 1): the MSE of the network's prediction at
uniformly drawn timesteps. The target is ``model.prediction`` (eps, x0 or v) and the per-example
weights ``train.loss_weighting`` (none, or Min-SNR-gamma); see :mod:`ddim_cli.parameterization`.

Adam/AdamW with linear warmup and an optional cosine decay, gradient clipping, an EMA of the
weights, optional label dropout for classifier-free guidance, bf16 autocast and torch.compile on
CUDA, and DistributedDataParallel under ``torchrun`` (only rank 0 writes).

Reproducibility: the initial weights, and every random draw of step ``k`` on rank ``r`` (data
order, augmentation, label dropout, timesteps, noise, dropout masks) come from seeds derived from
``(train.seed, k, r)``, so
the whole state of a run is its weights, its optimizer state and its step: a resumed run is
bit-identical on CPU to one that never stopped.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ddim_cli import run_loop
from ddim_cli.acceleration import (
    autocast,
    compile_model,
    estimated_eager_seconds,
    resolve_compile,
    resolve_precision,
    set_fp32_math,
    use_channels_last,
    use_compile_cache,
)
from ddim_cli.config import Config
from ddim_cli.fid import FeatureExtractor
from ddim_cli.monitor import TrainingFID, save_sample_grid
from ddim_cli.parameterization import loss_weights, training_target
from ddim_cli.run_log import RunLog
from ddim_cli.run_loop import (
    Objective,
    TrainingError,
    TrainingInterrupted,
    learning_rate,
    make_optimizer,
)
from ddim_cli.seeding import derived_seed
from ddim_cli.unet import UNet

__all__ = ["TrainResult", "TrainingError", "TrainingInterrupted", "learning_rate", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path
    rank: int = 0  # under torchrun, this process's rank (only rank 0 writes and reports)


def train(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
    fid_extractor: FeatureExtractor | None = None,
) -> TrainResult:
    """Train a new run in ``run_dir`` (``overwrite`` replaces an existing one) or resume it.

    ``fid_extractor`` replaces torch-fidelity's Inception for ``train.fid_every`` (tests use a
    small one); its statistics are cached under its ``__name__``.

    Everything that can fail on the user's input (run directory, dataset) is checked before
    anything in ``run_dir`` is written or removed.
    """
    if config.distill is not None:  # training on would overwrite a student with the denoising loss
        raise TrainingError(
            f"the config has a distill: section (a student of {config.distill.teacher}); ddim train trains "
            "teachers: continue a distillation run with ddim distill --resume RUN_DIR"
        )
    stop, shard, device_, dataset = run_loop.open_run(
        config, run_dir, resume=resume, overwrite=overwrite, device=device
    )
    cfg, rank, world = config.train, shard.rank, shard.world
    if len(dataset) < cfg.batch_size:
        raise TrainingError(f"the dataset has {len(dataset)} images, fewer than train.batch_size={cfg.batch_size}")
    num_classes = config.model.num_classes
    if num_classes is not None and (dataset.num_classes is None or dataset.num_classes > num_classes):
        raise TrainingError(
            f"model.num_classes={num_classes} but the {config.data.dataset} dataset has "
            f"{'no labels' if dataset.num_classes is None else f'{dataset.num_classes} classes'}"
        )
    with run_loop.locked(run_dir, shard, stop):
        fid = None
        if cfg.fid_every and rank == 0:
            name = "inception" if fid_extractor is None else getattr(fid_extractor, "__name__", "custom")
            fid = TrainingFID(run_dir, dataset, config, fid_extractor, name, device_)
        objective = DenoisingObjective(config, len(dataset), world, device_, fid)
        step, checkpoint = run_loop.run(
            objective,
            config,
            run_dir,
            dataset,
            shard,
            device_,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            stop=stop,
        )
        return TrainResult(run_dir, step, checkpoint, rank)


class DenoisingObjective(Objective):
    """DDPM's loss (Algorithm 1) on a U-Net of ``config`` initialised from ``train.seed``."""

    def __init__(self, config: Config, dataset_size: int, world: int, device: torch.device, fid: TrainingFID | None):
        cfg = config.train
        self.config, self.device, self.local_batch = config, device, cfg.batch_size // world
        self.total_steps, self.ema_decay = cfg.steps, cfg.ema_decay
        self.dataset_size, self.fid, self.start = dataset_size, fid, 0
        self.build_start = self.build_seconds = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(cfg.seed, 0, 0, "init"))  # the same initial weights on every rank and run
            self.model = UNet(config.unet_config()).to(device)
        self.layout = torch.channels_last if use_channels_last(device, config.data.image_size, training=True) else None
        if self.layout is not None:
            self.model.to(memory_format=self.layout)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = make_optimizer(self.model, config)
        self.precision = resolve_precision(cfg.precision, device)
        set_fp32_math(self.precision, device)
        ab = self.alpha_bars = config.alpha_bars()
        self.ab = ab.float().to(device)
        self.sqrt_ab, self.sqrt_one_minus_ab = ab.sqrt().float().to(device), (1 - ab).sqrt().float().to(device)
        self.compiled = False

    def describe(self) -> str:
        fast_path = [self.precision] + ["channels_last"] * (self.layout is not None) + ["compiled"] * self.compiled
        parameters = sum(p.numel() for p in self.model.parameters()) / 1e6
        return f"denoising on {self.dataset_size} images, {parameters:.2f}M parameters ({', '.join(fast_path)})"

    def restore(self, state: dict, step: int) -> None:
        self.start = step

    def prepare(self, net):
        cfg = self.config.train
        eager_seconds = None
        if cfg.compile == "auto" and self.device.type == "cuda":  # a step is a forward and a backward: 3 calls' work
            left = cfg.steps - self.start
            calls = 3 * left * self.local_batch
            eager_seconds = estimated_eager_seconds(self.config.unet_config(), calls, 3 * left, self.precision)
        self.compiled = resolve_compile(cfg.compile, self.device, eager_seconds)
        # its build is timed as the first step, backward included
        return compile_model(net, notify=None) if self.compiled else net

    def before_step(self, step: int, start: int) -> None:
        if self.compiled and step == start:
            self.build_start = time.perf_counter()

    def learning_rate(self, step: int) -> float:
        return learning_rate(self.config.train, step)

    def loss(self, net, x0, labels, generator, step):
        config = self.config
        x0, labels = _augment(x0, labels, config, generator)
        t = torch.randint(0, len(self.ab), (self.local_batch,), device=self.device, generator=generator)
        noise = torch.randn(x0.shape, device=self.device, generator=generator)
        view = (-1,) + (1,) * (x0.dim() - 1)
        x_t = self.sqrt_ab[t].view(view) * x0 + self.sqrt_one_minus_ab[t].view(view) * noise  # q(x_t | x_0), Eq. 4
        if self.layout is not None:
            x_t = x_t.contiguous(memory_format=self.layout)
        with autocast(self.precision, self.device):
            prediction = net(x_t, t, labels) if config.model.num_classes is not None else net(x_t, t)
        ab_t = self.ab[t].view(view)
        target = training_target(x0, noise, ab_t, config.model.prediction)
        per_example = (prediction.float() - target).pow(2).flatten(1).mean(1)
        cfg = config.train
        weights = loss_weights(ab_t.flatten(), config.model.prediction, cfg.loss_weighting, cfg.min_snr_gamma)
        return (weights * per_example).mean()

    def after_step(self, step: int) -> None:
        if self.build_start is not None:
            self.build_seconds, self.build_start = time.perf_counter() - self.build_start, None

    def after_log(self, step: int, log: RunLog) -> None:
        if self.build_seconds is not None:
            log.message(
                f"torch.compile: the training step built in {self.build_seconds:.1f} s (cache: {use_compile_cache()})"
            )
            self.build_seconds = None
        cfg, run_dir = self.config.train, log.run_dir
        if log.enabled and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            path = run_dir / "samples" / f"step-{step:07d}.png"
            save_sample_grid(self.ema, self.config, self.alpha_bars, path, self.device)
            log.grid(step, path)
        if self.fid is not None and (step % cfg.fid_every == 0 or step == cfg.steps):
            value = self.fid.measure(self.ema, self.alpha_bars, self.device)
            if value is not None:
                log.metrics(step=step, fid=value)
                log.message(f"step {step}: FID {value:.3f} ({cfg.fid_samples} EMA samples vs the training set)")


def _augment(x0: torch.Tensor, labels: torch.Tensor, config: Config, generator: torch.Generator):
    if config.data.random_flip:
        flip = torch.rand(x0.shape[0], device=x0.device, generator=generator) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
    num_classes = config.model.num_classes
    if num_classes is not None and config.train.label_dropout > 0:
        drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < config.train.label_dropout
        labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    return x0, labels
