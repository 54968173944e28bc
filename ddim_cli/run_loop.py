"""The one training loop that ``ddim train`` and every ``ddim distill`` method run, driven by an
:class:`Objective` (what is trained and its loss), and the pieces of a run around it: its
directory, the optimizer and EMA, durable checkpoints and their restore, what happens after a stop,
and the calls that keep torchrun's ranks in step (the log is :mod:`ddim_cli.run_log`, the data
stream :mod:`ddim_cli.training_data`, the stop itself :mod:`ddim_cli.stopping`).

Every random draw of step ``k`` on rank ``r`` comes from :func:`derived_seed` ``(seed, k, r,
purpose)``, so a run's whole state is its weights, its optimizer state and its step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ddim_cli import distributed, stopping
from ddim_cli.acceleration import describe_device
from ddim_cli.checkpoint import (
    list_checkpoints,
    load_weights,
    newest_intact,
    prune_checkpoints,
    remove_partial_writes,
    save_checkpoint,
)
from ddim_cli.config import Config
from ddim_cli.data import DataError, build_dataset
from ddim_cli.errors import TrainingError, describe_os_error
from ddim_cli.monitor import TensorBoardLog, plot_metrics, tensorboard_missing
from ddim_cli.run_log import LossWindow, RunLog
from ddim_cli.runlock import run_lock
from ddim_cli.seeding import derived_seed
from ddim_cli.threads import set_threads
from ddim_cli.training_data import data_batches

RUN_FILES = ("config.yaml", "metrics.jsonl", "train.log", "metrics.png")
RUN_GLOBS = ("fid-reference-*.npz",)  # cached statistics of the training set
RUN_DIRS = ("checkpoints", "samples", "students")  # students: a distillation's kept students


class TrainingInterrupted(RuntimeError):
    """Stopped before the end, by a signal or the time limit, after writing a checkpoint;
    ``status`` is the exit status that says which (:mod:`ddim_cli.stopping`)."""

    def __init__(
        self, step: int, run_dir: Path, reason: int, command: str = "ddim train", note: str = "", written: bool = True
    ):
        saved = "checkpoint written" if written else "no step was taken since the last checkpoint"
        super().__init__(
            f"stopped by {stopping.describe(reason)} at step {step}; {saved}{note}. "
            f"Resume with: {command} --resume {run_dir}"
        )
        self.step, self.status = step, stopping.exit_status(reason)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless asked (this touches nothing)."""
    if resume:
        # A run stopped before its first checkpoint (config.yaml written) is resumed from step 0.
        if not list_checkpoints(run_dir / "checkpoints") and not (run_dir / "config.yaml").is_file():
            raise TrainingError(f"cannot resume: {run_dir} holds no run (no config.yaml, no checkpoints)")
    elif holds_run(run_dir) and not overwrite:
        raise TrainingError(f"run directory {run_dir} already holds a run; pass --resume to continue it or --overwrite")


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES + RUN_DIRS)


def clear_run(run_dir: Path) -> None:
    """Remove our own files from a run directory (for --overwrite); anything else stays."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for pattern in RUN_GLOBS:
        for file in run_dir.glob(pattern):
            file.unlink()
    for name in RUN_DIRS:
        for file in (run_dir / name).glob("*"):
            if file.is_file():
                file.unlink()


def learning_rate(cfg, step: int) -> float:
    """Training's learning rate of optimizer step ``step`` (0-based), by :func:`scheduled_lr`."""
    return scheduled_lr(cfg.lr, cfg.warmup, cfg.lr_schedule, cfg.steps, step)


def scheduled_lr(peak: float, warmup: int, schedule: str, steps: int, step: int) -> float:
    """The rate of step ``step`` (0-based) of ``steps``: linear warmup over ``warmup`` steps, then
    ``peak`` constant or a cosine decay that reaches 0 after ``steps``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    cfg = config.train
    # fused: one kernel for all parameters, about 4x faster than the per-tensor loop on CPU.
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.weight_decay:
        raise TrainingError("train.weight_decay needs train.optimizer: adamw")
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # ema <- decay * ema + (1 - decay) * theta, as one fused op over all parameters.
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def save_run_checkpoint(
    run_dir, step, config, model, ema, optimizer, rank, log, dataset_size: int, extra_state: dict | None = None
) -> Path | None:
    """Rank 0 writes the one-file checkpoint of ``step`` (``extra_state``: more of the run's state,
    e.g. a distillation's target network) and prunes old ones."""
    if rank != 0:
        return None
    epoch, batch = divmod(step, dataset_size // config.train.batch_size)
    state = {
        "optimizer": optimizer.state_dict(),
        "step": step,
        "seed": config.train.seed,
        # Data order, noise and dropout are derived from (seed, step, rank): the step is the RNG state.
        "rng": "derived from (train.seed, step, rank)",
        "data_position": {"epoch": epoch, "batch_in_epoch": batch, "dataset_size": dataset_size},
        **(extra_state or {}),
    }
    try:
        path = save_checkpoint(run_dir / "checkpoints", step, config, model.state_dict(), ema.state_dict(), state)
    except OSError as error:
        previous = list_checkpoints(run_dir / "checkpoints")
        last = f"the last complete checkpoint is {previous[-1]}" if previous else "no checkpoint was written yet"
        raise TrainingError(
            f"could not write the checkpoint of step {step} ({describe_os_error(error)}); {last}"
        ) from None
    prune_checkpoints(run_dir / "checkpoints", config.train.keep_checkpoints)
    log.message(f"wrote {path}")
    return path


def restore_run(run_dir: Path, model, ema, optimizer) -> dict:
    """Load the newest intact checkpoint's weights and optimizer; returns its training state."""
    checkpoint = newest_intact(list_checkpoints(run_dir / "checkpoints")[::-1], training_state=True)
    load_weights(model, checkpoint.model, checkpoint.path)
    load_weights(ema, checkpoint.ema, checkpoint.path)
    state = checkpoint.training_state
    optimizer.load_state_dict(state["optimizer"])
    # Adam's moments must share their parameter's memory layout: the fused kernel walks both in
    # memory order, so moments saved in NCHW and resumed in channels_last would be mixed up.
    for param, moments in optimizer.state.items():
        for key, value in moments.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                moments[key] = torch.empty_like(param).copy_(value)
    return state


def next_batch(batches: Iterator, stop: stopping.StopFlag, step: int, start: int, run_dir: Path, command: str):
    """The next batch. A DataLoader worker killed by the signal that stops the run (it can reach a
    worker that has not yet set itself to ignore it, as the workers start at the run's first
    step) is that stop, not a crash: nothing was done since the last checkpoint."""
    try:
        return next(batches)
    except RuntimeError as error:
        if "DataLoader worker" not in str(error):
            raise
        waited = time.monotonic()
        while stop.reason is None and time.monotonic() - waited < 2.0:  # the same signal reaches us too
            time.sleep(0.05)
        if stop.reason is None or step != start:
            raise TrainingError(f"a data loading worker died: {error}") from None
        raise TrainingInterrupted(step, run_dir, stop.reason, command, written=False) from None


def after_stop(reason: int, requeue: bool, rank: int, log: RunLog) -> str:
    """What happens once a stop's checkpoint is written: with ``train.requeue``, SLURM's advance
    warning (SIGUSR1) requeues the job. Returns a note for the stop's message."""
    if reason != getattr(signal, "SIGUSR1", None) or not requeue or rank != 0:
        return ""
    outcome = stopping.requeue_under_slurm()
    log.message(outcome)
    return f"; {outcome}"


def open_run(config: Config, run_dir: Path, *, resume: bool, overwrite: bool, device: str):
    """What every run checks before it writes anything (its directory, TensorBoard, the batch's
    split over torchrun's ranks, the dataset); returns its stop flag (``train.time_limit``), shard,
    device and dataset. Every failure is a TrainingError in one line."""
    stop = stopping.StopFlag(stopping.deadline(config.train.time_limit, time.time()))
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if config.train.tensorboard and (missing := tensorboard_missing()):
        raise TrainingError(missing)
    shard, device_ = setup_distributed(device)
    if device_.type == "cpu":
        set_threads(config.train.threads or None, follow_load=False)  # the same arithmetic at every resume
    if config.train.batch_size % shard.world:
        raise TrainingError(
            f"train.batch_size {config.train.batch_size} does not split evenly over {shard.world} processes"
        )
    try:
        dataset = build_dataset(config.data)
    except DataError as error:
        raise TrainingError(str(error)) from None
    return stop, shard, device_, dataset


@contextlib.contextmanager
def locked(run_dir: Path, shard, stop: stopping.StopFlag, *folders: str):
    """The run's lock held and its stop signals installed (from here a signal or the time limit
    ends the run cleanly at the end of a step); checkpoint writes a killed process left unfinished
    in ``checkpoints`` and ``folders`` removed."""
    with stop.installed(), run_lock(run_dir, enabled=shard.main) as note:
        if note:
            tqdm.write(f"note: {note}")
        if shard.main:
            for folder in ("checkpoints", *folders):
                for path in remove_partial_writes(run_dir / folder):
                    tqdm.write(f"note: removed {path}, a checkpoint write that a killed process left unfinished")
        yield


def setup_distributed(device: str) -> tuple[distributed.Shard, torch.device]:
    try:
        return distributed.setup(device)
    except ValueError as error:
        raise TrainingError(str(error)) from None


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# --- the loop ---------------------------------------------------------------------------------------
class Objective:
    """What a run trains, and how: the loop below calls these hooks, and nothing in it depends on
    which objective it runs. ``model`` is the trained network, ``ema`` its average (the weights
    kept), ``optimizer`` its optimizer (an objective may replace it, e.g. at a round's start)."""

    command = "ddim train"  # what the stop message tells the user to resume with
    stream = "noise"  # names the step's random stream: derived_seed(seed, step, rank, stream)
    remedy = "try a lower train.lr or train.grad_clip"  # said when the loss becomes non-finite
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    total_steps: int
    ema_decay: float

    def describe(self) -> str:
        """What the run does, for its starting line."""
        raise NotImplementedError

    def restore(self, state: dict, step: int) -> None:
        """Continue from a checkpoint's training ``state`` at ``step`` (weights are already loaded)."""

    def prepare(self, net: torch.nn.Module) -> torch.nn.Module:
        """The network the step calls (e.g. compiled); ``net`` is ``model``, under DDP with torchrun."""
        return net

    def before_step(self, step: int, start: int) -> None:
        """Called before step ``step`` (``start``: the run's first step in this process)."""

    def learning_rate(self, step: int) -> float:
        raise NotImplementedError

    def loss(self, net, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, step: int):
        """The step's scalar loss on the batch ``(x0, labels)``; random draws from ``generator``."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after the optimizer and EMA updates of step ``step`` (e.g. a target network's EMA)."""

    def boundary(self, step: int) -> bool:
        """Whether ``step`` (completed steps) ends a stretch that is always logged and checkpointed."""
        return step == self.total_steps

    def fields(self, step: int) -> dict:
        """Extra fields of the metrics line that closes at ``step``."""
        return {}

    def after_log(self, step: int, log: RunLog) -> None:
        """Called after step ``step`` is logged, before its checkpoint (sample grids, FID, a kept student)."""

    def extra_state(self) -> dict | None:
        """More of the run's state for the checkpoint (e.g. a target network)."""
        return None


def run(
    objective: Objective,
    config: Config,
    run_dir: Path,
    dataset,
    shard,
    device,
    *,
    resume,
    overwrite,
    progress,
    stop: stopping.StopFlag,
) -> tuple[int, Path | None]:
    """Run ``objective`` in ``run_dir`` (checked and locked) to ``objective.total_steps``; returns the
    last step and its checkpoint (None on ranks other than 0). Raises TrainingInterrupted at a stop."""
    cfg, rank, world = config.train, shard.rank, shard.world
    start, log, hardware, net = _open(objective, config, run_dir, rank, world, device, resume, overwrite)
    batches = data_batches(dataset, config, start, rank, world, device)
    total = objective.total_steps
    bar = tqdm(total=total, initial=start, disable=not progress or rank != 0, dynamic_ncols=True, unit="step")
    window = LossWindow(device, world, cfg.batch_size, objective.remedy)
    step, checkpoint, run_start = start, None, time.perf_counter()
    # Closing the batches ends DataLoader workers before the process exits: they ignore the stop
    # signals, so Python's exit could not end them by SIGTERM.
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        contextlib.closing(log),
        contextlib.closing(batches),
    ):
        objective.model.train()
        while step < total:
            objective.before_step(step, start)
            x0, labels = next_batch(batches, stop, step, start, run_dir, objective.command)
            generator = torch.Generator(device).manual_seed(derived_seed(cfg.seed, step, rank, objective.stream))
            torch.manual_seed(derived_seed(cfg.seed, step, rank, "dropout"))  # dropout masks
            lr = objective.learning_rate(step)
            optimizer = objective.optimizer
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = objective.loss(net, x0, labels, generator, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.model.parameters(), cfg.grad_clip or math.inf)
            optimizer.step()
            update_ema(objective.ema, objective.model, objective.ema_decay)
            objective.after_step(step)
            step += 1
            window.add(loss)
            bar.update(1)

            at_log = step % cfg.log_every == 0 or objective.boundary(step)
            at_checkpoint = step % cfg.checkpoint_every == 0 or objective.boundary(step)
            stop_reason = stop.requested(world, check=at_log)
            if at_log or at_checkpoint or stop_reason is not None:
                window.close(step, lr, grad_norm, **objective.fields(step))
                for line in window.arrived(wait=at_checkpoint or stop_reason is not None):
                    log.metrics(**line)
                    bar.set_postfix(loss=f"{line['loss']:.4g}", img_s=f"{line['images_per_s']:.0f}")
            objective.after_log(step, log)
            if at_checkpoint or stop_reason is not None:
                with stop.timing_checkpoint():
                    checkpoint = save_run_checkpoint(
                        run_dir,
                        step,
                        config,
                        objective.model,
                        objective.ema,
                        optimizer,
                        rank,
                        log,
                        len(dataset),
                        objective.extra_state(),
                    )
                if rank == 0:
                    plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
            if stop_reason is not None:
                bar.close()
                del net  # DDP holds the process group, which the ranks leave now
                distributed.finish(shard)
                note = after_stop(stop_reason, cfg.requeue, rank, log)
                raise TrainingInterrupted(step, run_dir, stop_reason, objective.command, note)
    bar.close()
    del net
    distributed.finish(shard)
    seconds = time.perf_counter() - run_start
    log.message(
        f"finished at step {step}: {step - start} steps in {seconds:.0f} s, "
        f"{(step - start) * cfg.batch_size / max(seconds, 1e-9):.0f} images/s on {hardware}"
    )
    return step, checkpoint or (list_checkpoints(run_dir / "checkpoints") or [None])[-1]


def _open(objective: Objective, config: Config, run_dir: Path, rank, world, device, resume, overwrite):
    """Restore a resumed run's state, write its config, open its log and prepare the network the
    step calls; returns the first step, the log, the device's description and that network."""
    restart = resume and not list_checkpoints(run_dir / "checkpoints")  # stopped before its first checkpoint
    start = 0
    if resume and not restart:
        state = restore_run(run_dir, objective.model, objective.ema, objective.optimizer)
        start = int(state["step"])
        objective.restore(state, start)
    if rank == 0:
        if overwrite and not resume:
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml())  # on resume, with any new overrides
    barrier(world)
    board = None
    if config.train.tensorboard and rank == 0:
        board = TensorBoardLog(run_dir / "tensorboard", purge_step=start + 1 if resume else None)
    log = RunLog(run_dir, enabled=rank == 0, board=board)
    net = objective.prepare(DistributedDataParallel(objective.model) if world > 1 else objective.model)
    if restart:
        log.message(f"{run_dir} has no checkpoint yet (it stopped before its first): starting it again from step 0")
    hardware = describe_device(device)
    log.message(
        f"{'resuming at' if resume else 'starting'} step {start} of {objective.total_steps}: "
        f"{objective.describe()}; on {device} x{world} [{hardware}]"
    )
    if resume:
        log.truncate_metrics(after=start)
    return start, log, hardware, net
