"""What ``ddim distill`` does: a few-step student of a trained teacher, as a run directory like
``ddim train``'s (config.yaml with a ``distill:`` section, metrics.jsonl and metrics.png, train.log,
sample grids, durable checkpoints, the run lock, bit-exact ``--resume``, torchrun).

Progressive distillation (Salimans & Ho 2022, Algorithm 2) runs rounds: each starts the student
from its teacher (the first teacher's EMA weights, then the previous round's student), trains it
for ``distill.round_steps`` steps to match two teacher DDIM steps in one, and keeps its EMA
weights as ``students/S<N>.safetensors``, a checkpoint that samples with N DDIM steps and is the
next round's teacher. Consistency distillation (Song et al. 2023) is one such round whose student
is a consistency function, kept as ``students/S<N>.safetensors`` too. The formulas are in
:mod:`ddim_cli.distillation`.

For a class-conditional teacher the student learns the guided teacher (``distill.guidance`` and
``distill.guidance_rescale``, the teacher's ``sample.guidance`` by default; Meng et al. 2023,
stage one): one network call per step then gives the guided sample. Labels are dropped to the null
label with ``train.label_dropout``, where the teacher is unguided, so the null label still samples
unconditionally.

Randomness of step k on rank r comes from ``(train.seed, k, r)`` as in training, and a round's
teacher is a file in the run, so a resumed run is bit-identical on CPU to one that never stopped.
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

from ddim_cli import distillation as d
from ddim_cli.acceleration import autocast, describe_device, resolve_precision, set_fp32_math
from ddim_cli.checkpoint import list_checkpoints, load_checkpoint, remove_partial_writes, write_weights
from ddim_cli.config import Config, ConfigError, DistillConfig, apply_override, validate
from ddim_cli.data import DataError, build_dataset
from ddim_cli.guidance import classifier_free_guidance
from ddim_cli.models import STUDENTS, kept_students
from ddim_cli.monitor import TensorBoardLog, plot_metrics, save_sample_grid, tensorboard_missing
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
    make_optimizer,
    next_batch,
    restore_run,
    save_run_checkpoint,
    setup_distributed,
    update_ema,
)
from ddim_cli.runlock import run_lock
from ddim_cli.schedule import timesteps
from ddim_cli.stopping import StopFlag, deadline
from ddim_cli.training_data import data_batches
from ddim_cli.unet import UNet


@dataclass
class DistillResult:
    run_dir: Path
    step: int
    students: dict[int, Path]  # step count -> the student's checkpoint
    rank: int = 0  # under torchrun, this process's rank (only rank 0 writes)


def student_config(
    teacher: Config, teacher_path: Path, *, method: str = "consistency", steps: int = 4, overrides=()
) -> Config:
    """The run's config: the teacher's network and data, a ``distill:`` section, and a ``sample:``
    section that samples the student as it was trained (its steps, trailing spacing, no extra
    guidance). Raises ConfigError for what cannot be distilled, in one line."""
    if teacher.distill is not None:
        raise ConfigError(
            f"{teacher_path} is already a distilled student; distil its teacher ({teacher.distill.teacher})"
        )
    if teacher.model.prediction == "eps":
        raise ConfigError(
            "distillation needs a v- or x0-prediction teacher; this one predicts eps, from which a student cannot "
            "recover x0 at t = T-1 where alpha is ~0 (Salimans & Ho 2022, Section 4): train the teacher with "
            "--set model.prediction=v"
        )
    config = copy.deepcopy(teacher)
    conditional = teacher.model.num_classes is not None
    config.distill = DistillConfig(
        method=method,
        teacher=str(Path(teacher_path).resolve()),
        steps=steps,
        # 16 DDIM steps (a short schedule: its largest power of two), at least one round above --steps;
        # fewer, longer rounds measured best on the digits (BENCHMARKS.md, "Distillation")
        teacher_steps=max(min(16, _power_of_two(teacher.diffusion.num_timesteps)), 2 * steps),
        guidance=teacher.sample.guidance if conditional else 0.0,
        guidance_rescale=teacher.sample.guidance_rescale if conditional else 0.0,
    )
    if method == "consistency":  # one round on a 32-point grid at a lower rate: 2x the quickstart's training time
        config.distill.round_steps, config.distill.lr = 1150, 2e-4
    config.distill.grid_points = min(32, _power_of_two(teacher.diffusion.num_timesteps))
    config.name = f"{teacher.name}-{method}-S{steps}"
    for override in overrides:
        apply_override(config, override)
    validate(config)
    if config.distill.method == "progressive":
        T = config.diffusion.num_timesteps
        if config.distill.teacher_steps == config.distill.steps:
            raise ConfigError(
                f"distill.teacher_steps {config.distill.teacher_steps} equals --steps: nothing to distil; "
                "the teacher needs more steps than its student"
            )
        for count in d.halving_rounds(config.distill.teacher_steps, config.distill.steps):  # names the reachable
            # A student samples with `--skip trailing --steps N`: that must be the grid it learned.
            if not torch.equal(
                d.distillation_grid(T, config.distill.teacher_steps, count), timesteps(T, count, "trailing")
            ):
                raise ConfigError(
                    f"distill.teacher_steps {config.distill.teacher_steps} does not halve evenly to {count} steps "
                    f"on {T} timesteps; choose a teacher step count that divides {T} or is a power of two"
                )
    else:
        d.consistency_times(config.diffusion.num_timesteps, config.distill.grid_points, config.distill.steps)
    return with_student_steps(config, config.distill.steps)


def _power_of_two(count: int) -> int:
    """The largest power of two not above ``count``."""
    return 2 ** int(math.log2(count))


def with_student_steps(config: Config, steps: int) -> Config:
    """``config`` as the ``steps``-step student's: ``sample`` set to how it samples."""
    student = copy.deepcopy(config)
    student.distill.steps = steps
    student.sample.steps, student.sample.skip, student.sample.eta = steps, "trailing", 0.0
    student.sample.guidance = student.sample.guidance_rescale = 0.0  # guidance is distilled in
    student.train.steps = len(rounds(student)) * student.distill.round_steps
    validate(student)
    return student


def rounds(config: Config) -> list[int]:
    """The student step count of each round (consistency: one round)."""
    x = config.distill
    return d.halving_rounds(x.teacher_steps, x.steps) if x.method == "progressive" else [x.steps]


def student_path(run_dir: Path, steps: int) -> Path:
    return Path(run_dir) / STUDENTS / f"S{steps}.safetensors"  # what kept_students finds


def distill(
    config: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> DistillResult:
    """Distil ``config.distill.teacher`` into ``run_dir`` (see the module notes); ``config`` comes
    from :func:`student_config` (or the run's config.yaml on resume)."""
    stop = StopFlag(deadline(config.train.time_limit, time.time()))
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if config.train.tensorboard and (missing := tensorboard_missing()):
        raise TrainingError(missing)
    shard, device_ = setup_distributed(device)
    if config.train.batch_size % shard.world:
        raise TrainingError(f"train.batch_size {config.train.batch_size} does not split evenly over {shard.world}")
    try:
        dataset = build_dataset(config.data)
    except DataError as error:
        raise TrainingError(str(error)) from None
    teacher = load_checkpoint(Path(config.distill.teacher))  # checked before anything is written
    # From here a stop signal (or the time limit) ends the run cleanly at the end of a step.
    with stop.installed(), run_lock(run_dir, enabled=shard.main) as note:
        if note:
            tqdm.write(f"note: {note}")
        if shard.main:
            for path in remove_partial_writes(run_dir / "checkpoints") + remove_partial_writes(run_dir / STUDENTS):
                tqdm.write(f"note: removed {path}, a checkpoint write that a killed process left unfinished")
        distillation = _Distillation(config, run_dir, dataset, teacher.ema, shard, device_)
        return distillation.run(resume, overwrite, progress, stop)


class _Distillation:
    """One distillation run, once its directory is checked and locked."""

    def __init__(self, config: Config, run_dir: Path, dataset, teacher_weights: dict, shard, device: torch.device):
        self.config, self.run_dir, self.dataset, self.shard, self.device = config, run_dir, dataset, shard, device
        self.x = config.distill
        self.plan = rounds(config)
        self.total = len(self.plan) * self.x.round_steps
        self.first_teacher = teacher_weights
        T = config.diffusion.num_timesteps
        # Computed once, not per step: each round's teacher grid with -1 (the data) appended, and
        # the consistency discretisation.
        self.grids = {}
        for steps in self.plan if self.x.method == "progressive" else []:
            grid = d.distillation_grid(T, self.x.teacher_steps, 2 * steps)
            self.grids[steps] = torch.cat([grid, grid.new_full((1,), -1)]).to(device)
        self.consistency_grid = d.consistency_grid(T, self.x.grid_points).to(device)
        self.ab = config.alpha_bars()
        self.ab_device = self.ab.float().to(device)
        self.null = config.model.num_classes
        self.precision = resolve_precision(config.train.precision, device)
        set_fp32_math(self.precision, device)
        with torch.random.fork_rng(devices=[]):
            self.model = UNet(config.unet_config()).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.target = copy.deepcopy(self.model).requires_grad_(False).eval()  # consistency's theta-minus
        self.optimizer = make_optimizer(self.model, config)

    # --- rounds ---------------------------------------------------------------------------------
    def teacher_weights(self, round_index: int) -> dict:
        if round_index == 0:
            return self.first_teacher
        return load_checkpoint(student_path(self.run_dir, self.plan[round_index - 1])).ema

    def begin_round(self, round_index: int) -> None:
        """The student, its EMA and the target start from the round's teacher; Adam starts afresh."""
        weights = self.teacher_weights(round_index)
        for net in (self.teacher, self.model, self.ema, self.target):
            net.load_state_dict(weights)
        self.optimizer = make_optimizer(self.model, self.config)

    def resume(self) -> int:
        """Weights, optimizer and (consistency) target of the newest intact checkpoint, and the
        teacher of its round; returns its step."""
        state = restore_run(self.run_dir, self.model, self.ema, self.optimizer)
        step = int(state["step"])
        self.teacher.load_state_dict(self.teacher_weights(min(step // self.x.round_steps, len(self.plan) - 1)))
        self.target.load_state_dict(state.get("target") or self.ema.state_dict())
        return step

    # --- the two objectives ---------------------------------------------------------------------
    def teacher_x0(self, labels: torch.Tensor | None):
        """The guided teacher's data prediction (unguided for null labels: guidance then cancels)."""
        model = self.teacher
        if labels is not None:
            model = classifier_free_guidance(
                self.teacher, labels, self.x.guidance, null_label=self.null, rescale=self.x.guidance_rescale
            )
        return self.x0_model(model)

    def x0_model(self, net, labels: torch.Tensor | None = None):
        def x0(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast(self.precision, self.device):
                output = net(z, t) if labels is None else net(z, t, labels)
            return d.x0_from_output(output.float(), z, self.ab_device[t], self.config.model.prediction)

        return x0

    def loss(self, net, x0, labels, generator, round_index: int) -> torch.Tensor:
        batch = len(x0)
        noise = torch.randn(x0.shape, device=self.device, generator=generator)
        teacher = self.teacher_x0(labels)
        student = self.x0_model(net, labels)
        if self.x.method == "progressive":
            steps = self.plan[round_index]
            grid = self.grids[steps]
            i = torch.randint(0, steps, (batch,), device=self.device, generator=generator)
            t, t_mid, t_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
            z = self._noised(x0, noise, t)
            target = d.progressive_target(teacher, z, t, t_mid, t_next, self.ab)
            per_example = d.progressive_loss(student(z, t), target, self.ab_device[t])
            if self.x.weighting == "none":
                per_example = per_example / d.truncated_snr_weight(self.ab_device[t])
            return per_example.mean()
        grid = self.consistency_grid
        j = torch.randint(0, len(grid) - self.x.skip_points, (batch,), device=self.device, generator=generator)
        t, t_prev = grid[j], grid[j + self.x.skip_points]
        z = self._noised(x0, noise, t)
        target = d.consistency_target(teacher, self.x0_model(self.target, labels), z, t, t_prev, self.ab)
        return d.pseudo_huber(d.consistency_function(student, z, t), target).mean()

    def _noised(self, x0, noise, t):
        ab_t = self.ab_device[t].view(-1, *([1] * (x0.dim() - 1)))
        return ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise  # q(x_t | x_0), DDPM Eq. 4

    def learning_rate(self, step: int) -> float:
        in_round = step % self.x.round_steps
        return self.x.lr * min(1.0, (in_round + 1) / self.x.warmup) if self.x.warmup else self.x.lr

    # --- the run --------------------------------------------------------------------------------
    def run(self, resume: bool, overwrite: bool, progress: bool, stop: StopFlag) -> DistillResult:
        cfg, x, rank, world = self.config.train, self.x, self.shard.rank, self.shard.world
        restart = resume and not list_checkpoints(self.run_dir / "checkpoints")
        start = 0
        if resume and not restart:
            start = self.resume()
        if start % x.round_steps == 0 and start < self.total:
            self.begin_round(start // x.round_steps)  # a round's start needs nothing from the checkpoint
        if self.shard.main:
            if overwrite and not resume:
                clear_run(self.run_dir)
                for stale in (self.run_dir / STUDENTS).glob("*.safetensors"):
                    stale.unlink()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config.to_yaml())
        barrier(world)
        board = None
        if cfg.tensorboard and rank == 0:
            board = TensorBoardLog(self.run_dir / "tensorboard", purge_step=start + 1 if resume else None)
        log = RunLog(self.run_dir, enabled=rank == 0, board=board)
        hardware = describe_device(self.device)
        if restart:
            log.message(f"{self.run_dir} has no checkpoint yet (it stopped before its first): starting it again")
        if x.method == "progressive":
            what = f"progressive distillation, {' -> '.join(map(str, [x.teacher_steps, *self.plan]))} steps"
        else:
            what = f"consistency distillation on a {x.grid_points}-point grid, for {x.steps}-step sampling"
        log.message(
            f"{'resuming at' if resume else 'starting'} step {start} of {self.total}: {what} of {x.teacher} on "
            f"{self.device} x{world} [{hardware}] ({self.precision}); guidance {x.guidance:g}"
        )
        if resume:
            log.truncate_metrics(after=start)
        net = DistributedDataParallel(self.model) if world > 1 else self.model
        batches = data_batches(self.dataset, self.config, start, rank, world, self.device)
        bar = tqdm(total=self.total, initial=start, disable=not progress or rank != 0, dynamic_ncols=True, unit="step")
        window = LossWindow(self.device, world, cfg.batch_size, "try a lower distill.lr")
        step, run_start = start, time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), contextlib.closing(log), contextlib.closing(batches):
            self.model.train()
            while step < self.total:
                round_index = step // x.round_steps
                if step % x.round_steps == 0 and step != start:
                    self.begin_round(round_index)
                x0, labels = next_batch(batches, stop, step, start, self.run_dir, "ddim distill")
                generator = torch.Generator(self.device).manual_seed(derived_seed(cfg.seed, step, rank, "distill"))
                torch.manual_seed(derived_seed(cfg.seed, step, rank, "dropout"))
                if self.null is not None and cfg.label_dropout > 0:
                    drop = torch.rand(len(labels), device=self.device, generator=generator) < cfg.label_dropout
                    labels = torch.where(drop, torch.full_like(labels, self.null), labels)
                lr = self.learning_rate(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss = self.loss(net, x0, labels if self.null is not None else None, generator, round_index)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
                self.optimizer.step()
                update_ema(self.ema, self.model, x.ema_decay)
                if x.method == "consistency":
                    update_ema(self.target, self.model, x.target_ema)
                step += 1
                window.add(loss)
                bar.update(1)
                round_done = step % x.round_steps == 0
                at_log = step % cfg.log_every == 0 or round_done
                at_checkpoint = step % cfg.checkpoint_every == 0 or round_done
                stopping = stop.requested(world, check=at_log)
                if at_log or at_checkpoint or stopping is not None:
                    window.close(step, lr, grad_norm, student_steps=self.plan[round_index])
                    for line in window.arrived(wait=at_checkpoint or stopping is not None):
                        log.metrics(**line)
                        bar.set_postfix(loss=f"{line['loss']:.4g}", S=line["student_steps"])
                if round_done:
                    self.keep_student(self.plan[round_index], step, log)
                    barrier(world)  # the next round's teacher is that file: every rank waits for it
                if at_checkpoint or stopping is not None:
                    extra = {"target": self.target.state_dict()} if x.method == "consistency" else None
                    with stop.timing_checkpoint():
                        save_run_checkpoint(
                            self.run_dir,
                            step,
                            self.config,
                            self.model,
                            self.ema,
                            self.optimizer,
                            rank,
                            log,
                            len(self.dataset),
                            extra,
                        )
                    if rank == 0:
                        plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "metrics.png")
                if stopping is not None:
                    bar.close()
                    barrier(world)
                    note = after_stop(stopping, cfg.requeue, rank, log)
                    raise TrainingInterrupted(step, self.run_dir, stopping, "ddim distill", note)
        bar.close()
        barrier(world)
        seconds = time.perf_counter() - run_start
        log.message(f"finished at step {step}: {step - start} steps in {seconds:.0f} s on {hardware}")
        return DistillResult(self.run_dir, step, kept_students(self.run_dir), rank)

    def keep_student(self, steps: int, step: int, log: RunLog) -> None:
        """Write the round's student (its EMA weights) and a grid of its samples from fixed seeds."""
        if not self.shard.main:
            return
        student = with_student_steps(self.config, steps)
        weights = self.ema.state_dict()
        path = student_path(self.run_dir, steps)
        try:
            write_weights(path, step, student, weights, weights)
        except OSError as error:
            raise TrainingError(f"could not write {path} ({error.strerror or error})") from None
        grid = self.run_dir / "samples" / f"S{steps}-step-{step:07d}.png"
        save_sample_grid(self.ema, student, self.ab, grid, self.device)
        log.grid(step, grid)
        log.message(f"wrote the {steps}-step student {path} and its samples {grid}")
