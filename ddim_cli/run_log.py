"""A run's record: its log file and metrics lines (and TensorBoard), and the loss window that reads
the step's loss back without a host sync."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ddim_cli.errors import TrainingError
from ddim_cli.monitor import TensorBoardLog, read_metrics


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
            kept = [record for record in read_metrics(path) if record["step"] <= after]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))


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
