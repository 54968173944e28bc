"""The objectives of progressive and consistency distillation over the shared
:class:`~ddim_cli.distillation.objective.Distillation`; their formulas are in
:mod:`~ddim_cli.distillation.progressive` and :mod:`~ddim_cli.distillation.consistency`."""

from __future__ import annotations

import torch

from ddim_cli.distillation.consistency import consistency_function, consistency_grid, consistency_target, pseudo_huber
from ddim_cli.distillation.objective import Distillation
from ddim_cli.distillation.progressive import (
    distillation_grid,
    progressive_loss,
    progressive_target,
    truncated_snr_weight,
)
from ddim_cli.run_loop import update_ema


class ProgressiveDistillation(Distillation):
    """PD, Algorithm 2: each round's student matches two of its teacher's DDIM steps in one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        T = self.config.diffusion.num_timesteps
        self.grids = {}  # each round's teacher grid with -1 (the data) appended, computed once
        for steps in self.plan:
            grid = distillation_grid(T, self.x.teacher_steps, 2 * steps)
            self.grids[steps] = torch.cat([grid, grid.new_full((1,), -1)]).to(self.device)

    def describe(self) -> str:
        return f"progressive distillation, {' -> '.join(map(str, [self.x.teacher_steps, *self.plan]))} steps" + (
            f", of {self.x.teacher}; guidance {self.x.guidance:g}"
        )

    def loss(self, net, x0, labels, generator, step):
        labels = self.labels(labels, generator)
        noise = torch.randn(x0.shape, device=self.device, generator=generator)
        steps = self.plan[self.round_of(step)]
        grid = self.grids[steps]
        i = torch.randint(0, steps, (len(x0),), device=self.device, generator=generator)
        t, t_mid, t_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        z = self.noised(x0, noise, t)
        target = progressive_target(self.teacher_x0(labels), z, t, t_mid, t_next, self.ab)
        per_example = progressive_loss(self.x0_model(net, labels)(z, t), target, self.ab_device[t])
        if self.x.weighting == "none":
            per_example = per_example / truncated_snr_weight(self.ab_device[t])
        return per_example.mean()


class ConsistencyDistillation(Distillation):
    """CM, Algorithm 2, with DDIM as the ODE solver and an EMA target network (theta-minus)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grid = consistency_grid(self.config.diffusion.num_timesteps, self.x.grid_points).to(self.device)
        self.target = self.frozen_copy()

    def describe(self) -> str:
        return (
            f"consistency distillation on a {self.x.grid_points}-point grid, for {self.x.steps}-step sampling, "
            f"of {self.x.teacher}; guidance {self.x.guidance:g}"
        )

    def begin_round(self, round_index: int) -> None:
        super().begin_round(round_index)
        self.target.load_state_dict(self.teacher_weights(round_index))

    def restore(self, state: dict, step: int) -> None:
        super().restore(state, step)
        self.target.load_state_dict(state.get("target") or self.ema.state_dict())

    def extra_state(self) -> dict:
        return {"target": self.target.state_dict()}

    def loss(self, net, x0, labels, generator, step):
        labels = self.labels(labels, generator)
        noise = torch.randn(x0.shape, device=self.device, generator=generator)
        j = torch.randint(0, len(self.grid) - self.x.skip_points, (len(x0),), device=self.device, generator=generator)
        t, t_prev = self.grid[j], self.grid[j + self.x.skip_points]
        z = self.noised(x0, noise, t)
        target = consistency_target(self.teacher_x0(labels), self.x0_model(self.target, labels), z, t, t_prev, self.ab)
        return pseudo_huber(consistency_function(self.x0_model(net, labels), z, t), target).mean()

    def after_step(self, step: int) -> None:
        update_ema(self.target, self.model, self.x.target_ema)
