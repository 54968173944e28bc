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

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ddim_cli.acceleration import (
    autocast,
    compile_model,
    describe_device,
    estimated_eager_seconds,
    resolve_compile,
    resolve_precision,
    set_fp32_math,
    use_channels_last,
    use_compile_cache,
)
from ddim_cli.checkpoint import list_checkpoints, remove_partial_writes
from ddim_cli.config import Config
from ddim_cli.data import DataError, build_dataset
from ddim_cli.fid import FeatureExtractor
from ddim_cli.monitor import TensorBoardLog, TrainingFID, plot_metrics, save_sample_grid, tensorboard_missing
from ddim_cli.parameterization import loss_weights, training_target
from ddim_cli.run_loop import (
    LossWindow,
    RunLog,
    TrainingError,
    TrainingInterrupted,
    after_stop,
    barrier,
    check_run_dir,
    clear_run,
    derived_seed,
    learning_rate,
    make_optimizer,
    next_batch,
    restore_run,
    save_run_checkpoint,
    setup_distributed,
    update_ema,
)
from ddim_cli.runlock import run_lock
from ddim_cli.stopping import StopFlag, deadline
from ddim_cli.training_data import data_batches
from ddim_cli.unet import UNet

__all__ = ["TrainResult", "TrainingError", "TrainingInterrupted", "learning_rate", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path


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
    stop = StopFlag(deadline(config.train.time_limit, time.time()))
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if config.train.tensorboard and (missing := tensorboard_missing()):
        raise TrainingError(missing)
    shard, device_ = setup_distributed(device)
    rank, world = shard.rank, shard.world
    cfg = config.train
    if cfg.batch_size % world:
        raise TrainingError(f"train.batch_size {cfg.batch_size} does not split evenly over {world} processes")
    try:
        dataset = build_dataset(config.data)
    except DataError as error:
        raise TrainingError(str(error)) from None
    if len(dataset) < cfg.batch_size:
        raise TrainingError(f"the dataset has {len(dataset)} images, fewer than train.batch_size={cfg.batch_size}")
    num_classes = config.model.num_classes
    if num_classes is not None and (dataset.num_classes is None or dataset.num_classes > num_classes):
        raise TrainingError(
            f"model.num_classes={num_classes} but the {config.data.dataset} dataset has "
            f"{'no labels' if dataset.num_classes is None else f'{dataset.num_classes} classes'}"
        )

    # From here a stop signal (or the time limit) ends the run cleanly at the end of a step.
    with stop.installed(), run_lock(run_dir, enabled=rank == 0) as note:
        if note:
            tqdm.write(f"note: {note}")
        if rank == 0:
            for path in remove_partial_writes(run_dir / "checkpoints"):
                tqdm.write(f"note: removed {path}, a checkpoint write that a killed process left unfinished")
        return _train(config, run_dir, dataset, rank, world, device_, resume, overwrite, progress, fid_extractor, stop)


def _train(
    config, run_dir, dataset, rank, world, device_, resume, overwrite, progress, fid_extractor, stop: StopFlag
) -> TrainResult:
    """The run itself, once its directory is checked and locked."""
    cfg = config.train
    num_classes = config.model.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(cfg.seed, 0, 0, "init"))  # the same initial weights on every rank and run
        model = UNet(config.unet_config()).to(device_)
    layout = torch.channels_last if use_channels_last(device_, config.data.image_size, training=True) else None
    if layout is not None:
        model.to(memory_format=layout)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, config)
    restart = resume and not list_checkpoints(run_dir / "checkpoints")  # stopped before its first checkpoint
    start = int(restore_run(run_dir, model, ema, optimizer)["step"]) if resume and not restart else 0
    if rank == 0:
        if overwrite and not resume:
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml())  # on resume, with any new overrides
    barrier(world)

    local_batch = cfg.batch_size // world
    precision = resolve_precision(cfg.precision, device_)
    set_fp32_math(precision, device_)
    net = DistributedDataParallel(model) if world > 1 else model
    eager_seconds = None
    if cfg.compile == "auto" and device_.type == "cuda":  # a step is a forward and a backward: 3 calls' work
        left = cfg.steps - start
        eager_seconds = estimated_eager_seconds(config.unet_config(), 3 * left * local_batch, 3 * left, precision)
    compiled = resolve_compile(cfg.compile, device_, eager_seconds)
    if compiled:
        net = compile_model(net, notify=None)  # its build is timed as the first step, backward included
    ab = config.alpha_bars()
    ab_device = ab.float().to(device_)
    sqrt_ab, sqrt_one_minus_ab = ab.sqrt().float().to(device_), (1 - ab).sqrt().float().to(device_)
    fast_path = [precision] + ["channels_last"] * (layout is not None) + ["compiled"] * compiled

    board = None
    if cfg.tensorboard and rank == 0:
        board = TensorBoardLog(run_dir / "tensorboard", purge_step=start + 1 if resume else None)
    log = RunLog(run_dir, enabled=rank == 0, board=board)
    fid = None
    if cfg.fid_every and rank == 0:
        name = "inception" if fid_extractor is None else getattr(fid_extractor, "__name__", "custom")
        fid = TrainingFID(run_dir, dataset, config, fid_extractor, name, device_)
    if restart:
        log.message(f"{run_dir} has no checkpoint yet (it stopped before its first): starting it again from step 0")
    hardware = describe_device(device_)
    log.message(
        f"{'resuming at' if resume else 'starting'} step {start} of {cfg.steps} on {device_} x{world} "
        f"[{hardware}] ({', '.join(fast_path)}); {len(dataset)} images; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    )
    if resume:
        log.truncate_metrics(after=start)
    batches = data_batches(dataset, config, start, rank, world, device_)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or rank != 0, dynamic_ncols=True, unit="step")
    window = LossWindow(device_, world, cfg.batch_size, "try a lower train.lr or train.grad_clip")
    step, checkpoint = start, None
    run_start = time.perf_counter()

    # Closing the batches ends DataLoader workers before the process exits: they ignore the stop
    # signals, so Python's exit could not end them by SIGTERM.
    with (
        torch.random.fork_rng(devices=[device_] if device_.type == "cuda" else []),
        contextlib.closing(log),
        contextlib.closing(batches),
    ):
        model.train()
        while step < cfg.steps:
            x0, labels = next_batch(batches, stop, step, start, run_dir, "ddim train")
            generator = torch.Generator(device_).manual_seed(derived_seed(cfg.seed, step, rank, "noise"))
            torch.manual_seed(derived_seed(cfg.seed, step, rank, "dropout"))  # dropout masks
            x0, labels = _augment(x0, labels, config, generator)
            t = torch.randint(0, len(ab), (local_batch,), device=device_, generator=generator)
            noise = torch.randn(x0.shape, device=device_, generator=generator)
            view = (-1,) + (1,) * (x0.dim() - 1)
            x_t = sqrt_ab[t].view(view) * x0 + sqrt_one_minus_ab[t].view(view) * noise  # q(x_t | x_0), Eq. 4

            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if layout is not None:
                x_t = x_t.contiguous(memory_format=layout)
            with autocast(precision, device_):
                prediction = net(x_t, t, labels) if num_classes is not None else net(x_t, t)
            ab_t = ab_device[t].view(view)
            target = training_target(x0, noise, ab_t, config.model.prediction)
            per_example = (prediction.float() - target).pow(2).flatten(1).mean(1)
            weights = loss_weights(ab_t.flatten(), config.model.prediction, cfg.loss_weighting, cfg.min_snr_gamma)
            loss = (weights * per_example).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            optimizer.step()
            update_ema(ema, model, cfg.ema_decay)
            if compiled and step == start:
                log.message(
                    f"torch.compile: the training step built in {time.perf_counter() - run_start:.1f} s "
                    f"(cache: {use_compile_cache()})"
                )
            step += 1
            window.add(loss)
            bar.update(1)

            at_log = step % cfg.log_every == 0 or step == cfg.steps
            at_checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.steps
            stopping = stop.requested(world, check=at_log)
            if at_log or at_checkpoint or stopping is not None:
                window.close(step, lr, grad_norm)
                for line in window.arrived(wait=at_checkpoint or stopping is not None):
                    log.metrics(**line)
                    bar.set_postfix(loss=f"{line['loss']:.4f}", img_s=f"{line['images_per_s']:.0f}")

            if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                save_sample_grid(ema, config, ab, run_dir / "samples" / f"step-{step:07d}.png", device_)
                log.grid(step, run_dir / "samples" / f"step-{step:07d}.png")
            if fid is not None and (step % cfg.fid_every == 0 or step == cfg.steps):
                value = fid.measure(ema, ab, device_)
                if value is not None:
                    log.metrics(step=step, fid=value)
                    log.message(f"step {step}: FID {value:.3f} ({cfg.fid_samples} EMA samples vs the training set)")
            if at_checkpoint or stopping is not None:
                with stop.timing_checkpoint():
                    checkpoint = save_run_checkpoint(
                        run_dir, step, config, model, ema, optimizer, rank, log, len(dataset)
                    )
                if rank == 0:
                    plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
            if stopping is not None:
                bar.close()
                barrier(world)
                raise TrainingInterrupted(step, run_dir, stopping, note=after_stop(stopping, cfg.requeue, rank, log))
    bar.close()
    barrier(world)
    seconds = time.perf_counter() - run_start
    log.message(
        f"finished at step {step}: {step - start} steps in {seconds:.0f} s, "
        f"{(step - start) * cfg.batch_size / max(seconds, 1e-9):.0f} images/s on {hardware}"
    )
    return TrainResult(run_dir, step, checkpoint or list_checkpoints(run_dir / "checkpoints")[-1])


# --- pieces of the loop ----------------------------------------------------------------------------
def _augment(x0: torch.Tensor, labels: torch.Tensor, config: Config, generator: torch.Generator):
    if config.data.random_flip:
        flip = torch.rand(x0.shape[0], device=x0.device, generator=generator) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
    num_classes = config.model.num_classes
    if num_classes is not None and config.train.label_dropout > 0:
        drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < config.train.label_dropout
        labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    return x0, labels
