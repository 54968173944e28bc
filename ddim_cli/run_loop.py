"""The pieces of a run that ``ddim train`` and ``ddim distill`` share: its directory and lock, its
log and metrics, the optimizer and EMA, durable checkpoints and their restore, what happens after a
stop, and the calls that keep torchrun's ranks in step (the data stream is
:mod:`ddim_cli.training_data`, the stop itself :mod:`ddim_cli.stopping`).

Every random draw of step ``k`` on rank ``r`` comes from :func:`derived_seed` ``(seed, k, r,
purpose)``, so a run's whole state is its weights, its optimizer state and its step.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ddim_cli import distributed, stopping
from ddim_cli.checkpoint import CheckpointError, list_checkpoints, newest_intact, prune_checkpoints, save_checkpoint
from ddim_cli.config import Config
from ddim_cli.errors import describe_os_error
from ddim_cli.monitor import TensorBoardLog

RUN_FILES = ("config.yaml", "metrics.jsonl", "train.log", "metrics.png")
RUN_GLOBS = ("fid-reference-*.npz",)  # cached statistics of the training set
RUN_DIRS = ("checkpoints", "samples")


class TrainingError(RuntimeError):
    """Training cannot start or go on; described in one line."""


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


def derived_seed(seed: int, step: int, rank: int, purpose: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative 63-bit integer


def learning_rate(cfg, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup over ``cfg.warmup``
    steps, then constant or a cosine decay that reaches 0 after ``cfg.steps``."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
    try:
        model.load_state_dict(checkpoint.model)
        ema.load_state_dict(checkpoint.ema)
    except RuntimeError as error:
        raise CheckpointError(f"{checkpoint.path} does not fit the config: {str(error).splitlines()[0]}") from None
    state = checkpoint.training_state
    optimizer.load_state_dict(state["optimizer"])
    # Adam's moments must share their parameter's memory layout: the fused kernel walks both in
    # memory order, so moments saved in NCHW and resumed in channels_last would be mixed up.
    for param, moments in optimizer.state.items():
        for key, value in moments.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                moments[key] = torch.empty_like(param).copy_(value)
    return state


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, board: TensorBoardLog | None = None):
        self.run_dir, self.enabled, self.board = run_dir, enabled, board

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)
            with open(self.run_dir / "train.log", "a") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def metrics(self, **values) -> None:
        if self.enabled:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(values) + "\n")
            if self.board is not None:
                self.board.scalars(values["step"], {k: v for k, v in values.items() if k != "step"})

    def grid(self, step: int, path: Path) -> None:
        if self.enabled and self.board is not None:
            self.board.grid(step, path)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def truncate_metrics(self, after: int) -> None:
        """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
        path = self.run_dir / "metrics.jsonl"
        if self.enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= after]
            path.write_text("".join(line + "\n" for line in kept))


class LossWindow:
    """The mean loss and last gradient norm over the steps since the previous metrics line, read
    back without a host sync in the step: when a window closes its values are all-reduced and
    copied to host memory asynchronously, behind an event, and written out once they have
    arrived, at a later log step, or at once where the run waits anyway (``wait``: before a
    checkpoint, a stop or the end, so no checkpoint is written past a non-finite loss). On a
    CPU they arrive at once."""

    def __init__(self, device: torch.device, world: int, batch_size: int, remedy: str):
        self.device, self.world, self.batch_size, self.remedy = device, world, batch_size, remedy
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.start = 0, time.perf_counter()
        self.queued: list[tuple] = []

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.steps += 1

    def close(self, step: int, lr: float, grad_norm: torch.Tensor, **fields) -> None:
        """End the window at ``step``; its line will carry ``lr`` and ``fields`` as they are now."""
        loss = self.loss_sum / self.steps
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        values = torch.stack([loss, grad_norm.detach().float()])
        event = None
        if self.device.type == "cuda":
            host = torch.empty(values.shape, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        images_per_s = self.steps * self.batch_size / max(time.perf_counter() - self.start, 1e-9)
        self.queued.append((step, self.steps, values, event, lr, images_per_s, fields))
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.start = 0, time.perf_counter()

    def arrived(self, wait: bool) -> list[dict]:
        """The closed windows whose values are on the host (all of them with ``wait``), oldest
        first, as metrics lines; a TrainingError for a non-finite loss."""
        lines = []
        while self.queued and (wait or self.queued[0][3] is None or self.queued[0][3].query()):
            step, steps, values, event, lr, images_per_s, fields = self.queued.pop(0)
            if event is not None:
                event.synchronize()
            loss, grad_norm = values.tolist()
            if not math.isfinite(loss):
                raise TrainingError(
                    f"the loss became non-finite between steps {step - steps + 1} and {step}; "
                    f"no checkpoint was written for it ({self.remedy})"
                )
            lines.append(dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, images_per_s=images_per_s, **fields))
        return lines


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


def setup_distributed(device: str) -> tuple[distributed.Shard, torch.device]:
    try:
        return distributed.setup(device)
    except ValueError as error:
        raise TrainingError(str(error)) from None


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
