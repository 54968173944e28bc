"""What every distillation method's objective shares, over :class:`ddim_cli.run_loop.Objective`:
rounds (each starts the student from its teacher: the first teacher's EMA weights, then the
previous round's kept student), the guided teacher's data prediction, label dropout, the noising
``q(z_t | x)``, a constant learning rate after each round's warmup, and the student kept at each
round's end (its EMA weights, ``students/S<N>.safetensors``, with a grid of its samples).

For a class-conditional teacher the student learns the guided teacher (``distill.guidance`` and
``distill.guidance_rescale``; Meng et al. 2023, stage one): one network call per step then gives
the guided sample. Labels are dropped to the null label with ``train.label_dropout``, where the
teacher is unguided, so the null label still samples unconditionally.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ddim_cli.acceleration import autocast, resolve_precision, set_fp32_math
from ddim_cli.checkpoint import load_checkpoint, write_weights
from ddim_cli.config import Config
from ddim_cli.distillation.core import x0_from_output
from ddim_cli.distillation.students import rounds, student_path, with_student_steps
from ddim_cli.guidance import classifier_free_guidance
from ddim_cli.monitor import save_sample_grid
from ddim_cli.run_log import RunLog
from ddim_cli.run_loop import Objective, TrainingError, barrier, make_optimizer, scheduled_lr
from ddim_cli.unet import UNet


class Distillation(Objective):
    """One distillation run's objective; a method overrides :meth:`loss` (and the hooks it needs)."""

    command = "ddim distill"
    stream = "distill"
    remedy = "try a lower distill.lr"

    def __init__(self, config: Config, run_dir: Path, teacher_weights: dict, shard, device: torch.device):
        self.config, self.run_dir, self.shard, self.device = config, run_dir, shard, device
        self.x = config.distill
        self.plan = rounds(config)
        self.total_steps, self.ema_decay = len(self.plan) * self.x.round_steps, self.x.ema_decay
        self.first_teacher = teacher_weights
        self.ab = config.alpha_bars()
        self.ab_device = self.ab.float().to(device)
        self.null = config.model.num_classes
        self.precision = resolve_precision(config.train.precision, device)
        set_fp32_math(self.precision, device)
        with torch.random.fork_rng(devices=[]):
            self.model = UNet(config.unet_config()).to(device)
        self.ema = self.frozen_copy()
        self.teacher = self.frozen_copy()
        self.optimizer = make_optimizer(self.model, config)

    def frozen_copy(self) -> torch.nn.Module:
        return copy.deepcopy(self.model).requires_grad_(False).eval()

    # --- rounds ---------------------------------------------------------------------------------
    def teacher_weights(self, round_index: int) -> dict:
        if round_index == 0:
            return self.first_teacher
        return load_checkpoint(student_path(self.run_dir, self.plan[round_index - 1])).ema

    def begin_round(self, round_index: int) -> None:
        """The student and its EMA start from the round's teacher; Adam starts afresh."""
        weights = self.teacher_weights(round_index)
        for net in (self.teacher, self.model, self.ema):
            net.load_state_dict(weights)
        self.optimizer = make_optimizer(self.model, self.config)

    def round_of(self, step: int) -> int:
        """The round that step ``step`` (0-based) belongs to."""
        return min(step // self.x.round_steps, len(self.plan) - 1)

    def restore(self, state: dict, step: int) -> None:
        self.teacher.load_state_dict(self.teacher_weights(self.round_of(step)))

    def before_step(self, step: int, start: int) -> None:
        # A round's start needs nothing from a checkpoint: a run resumed there begins it afresh.
        if step % self.x.round_steps == 0:
            self.begin_round(step // self.x.round_steps)

    def boundary(self, step: int) -> bool:
        return step % self.x.round_steps == 0

    def fields(self, step: int) -> dict:
        return {"student_steps": self.plan[self.round_of(step - 1)]}

    def learning_rate(self, step: int) -> float:
        return scheduled_lr(self.x.lr, self.x.warmup, self.x.lr_schedule, self.x.round_steps, step % self.x.round_steps)

    # --- the pieces of a loss -------------------------------------------------------------------
    def labels(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """The batch's labels with ``train.label_dropout`` of them dropped to the null label (None
        for an unconditional teacher)."""
        if self.null is None:
            return None
        if self.config.train.label_dropout > 0:
            drop = torch.rand(len(labels), device=self.device, generator=generator) < self.config.train.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null), labels)
        return labels

    def teacher_x0(self, labels: torch.Tensor | None):
        """The guided teacher's data prediction (unguided for null labels: guidance then cancels)."""
        model = self.teacher
        if labels is not None:
            model = classifier_free_guidance(
                self.teacher, labels, self.x.guidance, null_label=self.null, rescale=self.x.guidance_rescale
            )
        return self.x0_model(model)

    def x0_model(self, net, labels: torch.Tensor | None = None):
        """``net``'s data prediction as a function of ``(z, t)``, in the run's precision."""

        def x0(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast(self.precision, self.device):
                output = net(z, t) if labels is None else net(z, t, labels)
            return x0_from_output(output.float(), z, self.ab_device[t], self.config.model.prediction)

        return x0

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab_t = self.ab_device[t].view(-1, *([1] * (x0.dim() - 1)))
        return ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise  # q(x_t | x_0), DDPM Eq. 4

    # --- the end of a round ---------------------------------------------------------------------
    def after_log(self, step: int, log: RunLog) -> None:
        if step % self.x.round_steps == 0:
            keep_student(self, self.plan[self.round_of(step - 1)], step, log)
            barrier(self.shard.world)  # the next round's teacher is that file: every rank waits for it


def keep_student(objective: Distillation, steps: int, step: int, log: RunLog) -> None:
    """Write the round's student (its EMA weights) and a grid of its samples from fixed seeds."""
    if not objective.shard.main:
        return
    student = with_student_steps(objective.config, steps)
    weights = objective.ema.state_dict()
    path = student_path(objective.run_dir, steps)
    try:
        write_weights(path, step, student, weights, weights)
    except OSError as error:
        raise TrainingError(f"could not write {path} ({error.strerror or error})") from None
    grid = objective.run_dir / "samples" / f"S{steps}-step-{step:07d}.png"
    save_sample_grid(objective.ema, student, objective.ab, grid, objective.device)
    log.grid(step, grid)
    log.message(f"wrote the {steps}-step student {path} and its samples {grid}")
