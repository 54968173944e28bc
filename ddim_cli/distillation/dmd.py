"""Distribution matching distillation: a one-step (or few-step) generator whose samples' distribution
matches its teacher's (Yin et al. 2023, "One-step Diffusion with Distribution Matching
Distillation", DMD below; Yin et al. 2024, "Improved Distribution Matching Distillation for Fast
Image Synthesis", DMD2).

The generator ``G`` is a network of the teacher's shape, initialised from it and used through the
consistency parameterisation (:func:`~ddim_cli.distillation.consistency.consistency_function`,
which is the network's own data prediction away from t = 0), so that its students sample with the
same chain as consistency students (CM Algorithm 1) and export to the same scheduler. With ``N``
steps, ``G`` is trained at each of the ``N`` trailing times on inputs made by the generator's own
chain from pure noise (DMD2, Section 4.5, "backward simulation"); one step is ``x = G(x_T, T - 1)``.

Each step:

1. ``distill.fake_updates`` updates of the *fake score* ``mu_fake`` (a second copy of the teacher)
   with the denoising loss on the generator's current samples (DMD Eq. 6; several updates per
   generator update: DMD2's two time-scale rule, Section 4.2); with ``distill.fake_batch`` each
   update takes that many samples at random from one batch the generator draws once per step (its
   weights do not change between the updates, so the batch is as good a draw for each);
2. the generator's loss: with ``x = G(z)``, ``t ~ U[min_level T, max_level T]`` and ``x_t`` its
   noised version, the KL gradient is ``(mu_fake(x_t, t) - mu_real(x_t, t))`` (DMD Eq. 7, in data
   predictions), where ``mu_real`` is the teacher guided at ``distill.guidance`` and rescaled by
   ``distill.guidance_rescale``, normalised per example by ``1 / mean |x - mu_real(x_t, t)|`` (DMD
   Eq. 8). It reaches ``G`` through the surrogate ``0.5 ||x - stopgrad(x - grad)||^2``, whose
   gradient in ``x`` is ``grad`` (scaled by the mean's 1/numel);
3. plus ``distill.regression_weight`` times the regression loss on ``distill.regression_pairs``
   teacher ODE pairs (DMD Eq. 9: noise and the teacher's ODE solution from it, here by
   DPM-Solver++(2M) in ``distill.teacher_steps`` log-SNR steps; a mean squared error here where DMD
   uses LPIPS); with several steps, each call at a step time ``tau`` learns the trajectories' points
   at ``tau`` against their ends (CausVid's ODE initialisation, Yin et al. 2025). With
   ``distill.regression_schedule: cosine`` the weight decays to 0 over the run: the pairs anchor
   the start, the distribution-matching gradient alone shapes the end (DMD2, Section 4.1, drops
   them altogether: they tie the student to the teacher's sampling paths). The student
   learns the pairs' images, so they should be good ones: on the quickstart teacher 16 DDIM steps
   score PCA-FD 18.1, 16 DPM-Solver++ steps 13.9 (50 DDIM steps 14.9).

4. plus ``distill.gan_weight`` times DMD2's GAN term (Section 4.3): a small classifier head on the
   fake score's bottleneck (its middle block's output) tells the training images, noised, from
   the generator's, noised alike; the fake score's updates add the head's loss (real 1, fake 0,
   non-saturating), the generator's loss ``softplus(-D(G(z)_t))``.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ddim_cli.acceleration import autocast
from ddim_cli.distillation.consistency import consistency_function
from ddim_cli.distillation.objective import Distillation
from ddim_cli.guidance import classifier_free_guidance
from ddim_cli.parameterization import loss_weights, training_target
from ddim_cli.run_loop import make_optimizer, scheduled_lr
from ddim_cli.sampling import sample
from ddim_cli.schedule import nearest_timesteps, spaceable_log_snr, timesteps
from ddim_cli.seeding import derived_seed

PAIR_BATCH = 256  # teacher ODE pairs are drawn in batches of this many


def distribution_matching_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """The surrogate whose gradient in ``x`` is DMD's (Eq. 7 and 8): ``(fake - real) / mean|x - real|``
    per example (over the mean's numel); ``real_x0`` and ``fake_x0`` are the two scores' data
    predictions at ``x`` noised, without gradient."""
    with torch.no_grad():
        scale = (x - real_x0).abs().flatten(1).mean(1).clamp_min(1e-8).view(-1, *([1] * (x.dim() - 1)))
        grad = torch.nan_to_num((fake_x0 - real_x0) / scale)
    return 0.5 * (x - (x - grad).detach()).pow(2).mean()


class Discriminator(nn.Module):
    """DMD2's GAN classifier head over the fake score's bottleneck features: one logit per image."""

    def __init__(self, channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.GroupNorm(min(32, channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(1)

    def judge(self, score: nn.Module, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The logits of noised images ``z``: the head over ``score``'s middle-block output."""
        captured = []
        hook = score.mid.block_2.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            score(z, t) if labels is None else score(z, t, labels)
        finally:
            hook.remove()
        return self(captured[0].float())


class DistributionMatching(Distillation):
    """DMD / DMD2 over the shared distillation objective (see the module notes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        T = self.config.diffusion.num_timesteps
        self.times = timesteps(T, self.x.steps, "lcm").to(self.device)
        self.levels = (int(self.x.min_level * T), min(T - 1, int(self.x.max_level * T)))
        self.fake = self.frozen_copy().requires_grad_(True).train()
        self.head = None
        if self.x.gan_weight:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derived_seed(self.config.train.seed, 0, 0, "dmd-head"))
                self.head = Discriminator(self.config.model.ch * self.config.model.ch_mult[-1]).to(self.device)
        self.fake_optimizer = self.make_fake_optimizer()
        self.pairs, self.step = None, 0
        self.fake_batch = min(self.x.fake_batch, self.config.train.batch_size)  # 0: a draw per update

    def describe(self) -> str:
        return (
            f"distribution matching distillation for {self.x.steps}-step sampling, {self.x.fake_updates} fake-score "
            f"updates per step{f' on {self.fake_batch} of one batch' if self.fake_batch else ''}"
            f"{f' at lr {self.x.fake_lr:g}' if self.x.fake_lr else ''}, "
            f"regression weight {self.x.regression_weight:g}"
            f"{' (cosine to 0)' if self.x.regression_schedule == 'cosine' else ''}"
            f"{f', GAN term {self.x.gan_weight:g}' if self.x.gan_weight else ''}, of {self.x.teacher}; "
            f"guidance {self.x.guidance:g}"
        )

    def make_fake_optimizer(self) -> torch.optim.Optimizer:
        """The fake score's optimizer (and the GAN head's, whose parameters it also holds)."""
        if self.head is None:
            return make_optimizer(self.fake, self.config)
        return make_optimizer(nn.ModuleList([self.fake, self.head]), self.config)

    def begin_round(self, round_index: int) -> None:
        super().begin_round(round_index)
        self.fake.load_state_dict(self.teacher_weights(round_index))
        self.fake_optimizer = self.make_fake_optimizer()

    def restore(self, state: dict, step: int) -> None:
        super().restore(state, step)
        self.fake.load_state_dict(state["fake"])
        if self.head is not None:
            self.head.load_state_dict(state["gan_head"])
        self.fake_optimizer.load_state_dict(state["fake_optimizer"])

    def extra_state(self) -> dict:
        state = {"fake": self.fake.state_dict(), "fake_optimizer": self.fake_optimizer.state_dict()}
        return state | ({"gan_head": self.head.state_dict()} if self.head is not None else {})

    # --- the step -------------------------------------------------------------------------------
    def loss(self, net, x0, labels, generator, step):
        labels = self.labels(labels, generator)
        fake_lr = (self.x.fake_lr or self.x.lr) * self.learning_rate(step) / self.x.lr
        self.step = step
        if self.fake_batch:  # one batch of the generator's samples, a random part of it per update
            with torch.no_grad():
                drawn = generate(self, self.model, labels, generator, len(x0), "dmd-chain-fake")
            for _ in range(self.x.fake_updates):
                part = torch.randperm(len(x0), device=self.device, generator=generator)[: self.fake_batch]
                update_fake_score(
                    self, drawn[part], None if labels is None else labels[part], generator, fake_lr, x0[part]
                )
        else:  # DMD2: each update on a batch of its own
            for update in range(self.x.fake_updates):
                with torch.no_grad():
                    samples = generate(self, self.model, labels, generator, len(x0), f"dmd-chain-{update}")
                update_fake_score(self, samples, labels, generator, fake_lr, x0)
        images = generate(self, net, labels, generator, len(x0), "dmd-chain")
        t = torch.randint(self.levels[0], self.levels[1] + 1, (len(images),), device=self.device, generator=generator)
        noise = torch.randn(images.shape, device=self.device, generator=generator)
        with torch.no_grad():
            z = self.noised(images.detach(), noise, t)
            real, fake = self.teacher_x0(labels)(z, t), self.x0_model(self.fake, labels)(z, t)
        loss = distribution_matching_loss(images, real, fake)
        if self.x.regression_weight:
            loss = loss + self.regression_weight_at(step) * regression_loss(self, net, generator, len(x0))
        if self.head is not None:
            with _frozen(self.fake):  # the generator's step trains the generator only
                logits = self.classify(images, labels, generator)
            loss = loss + self.x.gan_weight * F.softplus(-logits).mean()
        return loss

    def regression_weight_at(self, step: int) -> float:
        """``distill.regression_weight`` at step ``step`` (0-based): constant, or decayed by a cosine
        to 0 at the run's end, so that the last steps follow the distribution-matching gradient alone."""
        return scheduled_lr(self.x.regression_weight, 0, self.x.regression_schedule, self.x.round_steps, step)

    def classify(self, images: torch.Tensor, labels, generator) -> torch.Tensor:
        """The GAN head's logits for ``images`` noised to a random level (real: high)."""
        t = torch.randint(self.levels[0], self.levels[1] + 1, (len(images),), device=self.device, generator=generator)
        z = self.noised(images, torch.randn(images.shape, device=self.device, generator=generator), t)
        with autocast(self.precision, self.device):
            return self.head.judge(self.fake, z, t, labels)


def generate(objective: DistributionMatching, net, labels, generator, batch: int, draw: str) -> torch.Tensor:
    """The generator's samples of one batch: from pure noise, ``k`` steps of its own chain
    without gradient, then one call (DMD2's backward simulation). ``k`` is uniform over its
    steps, drawn on the host from ``draw`` (a name unique in the step), so no device sync."""
    config = objective.config
    shape = (batch, config.data.channels, *[config.data.image_size] * 2)
    x = torch.randn(shape, device=objective.device, generator=generator)
    k = derived_seed(config.train.seed, objective.step, objective.shard.rank, draw) % len(objective.times)
    student = objective.x0_model(objective.model, labels)
    for i in range(k):
        with torch.no_grad():
            x = consistency_function(student, x, objective.times[i].expand(batch))
            level = objective.ab_device[objective.times[i + 1]]
            x = level.sqrt() * x + (1 - level).sqrt() * torch.randn(shape, device=objective.device, generator=generator)
    return consistency_function(objective.x0_model(net, labels), x, objective.times[k].expand(batch))


def update_fake_score(
    objective: DistributionMatching, samples: torch.Tensor, labels, generator, lr: float, real: torch.Tensor
) -> None:
    """One step of the fake score's denoising loss on ``samples`` (DMD Eq. 6), weighted as the
    teacher was trained, and with the GAN term, its head's loss on ``real`` against ``samples``."""
    t = torch.randint(0, len(objective.ab_device), (len(samples),), device=objective.device, generator=generator)
    noise = torch.randn(samples.shape, device=objective.device, generator=generator)
    z = objective.noised(samples, noise, t)
    prediction, cfg = objective.config.model.prediction, objective.config.train
    with autocast(objective.precision, objective.device):
        output = objective.fake(z, t) if labels is None else objective.fake(z, t, labels)
    ab_t = objective.ab_device[t].view(-1, *([1] * (samples.dim() - 1)))
    per_example = (output.float() - training_target(samples, noise, ab_t, prediction)).pow(2).flatten(1).mean(1)
    loss = (loss_weights(ab_t.flatten(), prediction, cfg.loss_weighting, cfg.min_snr_gamma) * per_example).mean()
    if objective.head is not None:
        fake_logits = objective.classify(samples, labels, generator)
        real_logits = objective.classify(real, labels, generator)
        loss = loss + objective.x.gan_weight * (F.softplus(fake_logits) + F.softplus(-real_logits)).mean()
    for group in objective.fake_optimizer.param_groups:
        group["lr"] = lr
    objective.fake_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = [p for group in objective.fake_optimizer.param_groups for p in group["params"]]
    _mean_over_ranks(parameters, objective.shard.world)
    torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip or float("inf"))
    objective.fake_optimizer.step()


def regression_loss(objective: DistributionMatching, net, generator, batch: int) -> torch.Tensor:
    """DMD Eq. 9: the generator's call on a batch of the teacher's ODE trajectories against the
    teacher's images at their ends (mean squared error). With several steps each example's call is
    at one of the generator's step times, uniform, from the trajectory's point there (CausVid's ODE
    initialisation), so the pairs anchor every call as they anchor the first."""
    if objective.pairs is None:
        objective.pairs = teacher_ode_pairs(objective)
    starts, labels, images = objective.pairs
    index = torch.randint(0, len(starts), (batch,), device=objective.device, generator=generator)
    if len(objective.times) > 1:
        k = torch.randint(0, len(objective.times), (batch,), device=objective.device, generator=generator)
    else:  # one step: no draw, so a one-step run's stream stays that of the first call's pairs alone
        k = torch.zeros(batch, dtype=torch.long, device=objective.device)
    picked = None if labels is None else labels[index]
    student = objective.x0_model(net, picked)
    return (consistency_function(student, starts[index, k], objective.times[k]) - images[index]).pow(2).mean()


@torch.no_grad()
def teacher_ode_pairs(objective: DistributionMatching) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """DMD Eq. 9's pairs, ``distill.regression_pairs`` of them, the same on every rank and at every
    resume: the points of the guided teacher's ODE trajectories at the generator's ``distill.steps``
    step times (shape ``(pairs, steps, C, H, W)``; the first is the noise), their labels (null with
    ``train.label_dropout``) and the images the trajectories end at. The ODE is solved by
    DPM-Solver++(2M) on about ``distill.teacher_steps`` log-SNR steps through the step times
    (:func:`trajectory_grid`)."""
    config, x, device, null = objective.config, objective.x, objective.device, objective.null
    count, shape = x.regression_pairs, (config.data.channels, *[config.data.image_size] * 2)
    draw = torch.Generator().manual_seed(derived_seed(config.train.seed, 0, 0, "dmd-pairs"))
    noise = torch.randn((count, *shape), generator=draw)
    labels = None
    if null is not None:
        labels = torch.randint(0, null, (count,), generator=draw)
        drop = torch.rand(count, generator=draw) < config.train.label_dropout
        labels = torch.where(drop, torch.full_like(labels, null), labels).to(device)
    noise = noise.to(device)
    stops = timesteps(config.diffusion.num_timesteps, x.steps, "lcm")  # the generator's; the first is the noise's
    grid = trajectory_grid(objective.ab, stops.tolist(), x.teacher_steps)
    later = stops.tolist()[1:]
    stop_after = {i: later.index(t) + 1 for i, t in enumerate(grid.tolist()[1:]) if t in later}  # step -> k
    starts, images = noise.new_empty((count, len(stops), *shape)), []
    starts[:, 0] = noise
    for first in range(0, count, PAIR_BATCH):
        chunk = slice(first, first + PAIR_BATCH)
        model = objective.teacher
        if labels is not None:
            model = classifier_free_guidance(
                model, labels[chunk], x.guidance, null_label=null, rescale=x.guidance_rescale
            )

        def keep(i, t, state, x0_hat, chunk=chunk):  # the state after step i is at grid[i + 1]
            if i in stop_after:
                starts[chunk, stop_after[i]] = state

        images.append(
            sample(
                model,
                noise[chunk],
                objective.ab,
                grid,
                method="dpm++2m",
                prediction=config.model.prediction,
                callback=keep,
            )
        )
    return starts, labels, torch.cat(images)


def trajectory_grid(alpha_bars: torch.Tensor, stops: list[int], steps: int) -> torch.Tensor:
    """About ``steps`` decreasing timesteps from ``stops[0]`` to 0 through every one of ``stops``:
    each stretch between stops (and the last, down to 0) gets a share of the steps in proportion to
    its log-SNR span, spaced evenly in log-SNR within it (timesteps that coincide are kept once); one
    stop gives the ``logsnr`` spacing's grid. DPM-Solver++(2M) wants even steps: the stops put into
    one even grid instead raised its error on a Gaussian's exact ODE by half (0.043 -> 0.065 at 16
    steps; this way 0.046)."""
    if len(stops) == 1:
        return timesteps(len(alpha_bars), steps, "logsnr", alpha_bars)
    log_snr = spaceable_log_snr(alpha_bars)
    ends = [*stops, 0] if stops[-1] != 0 else stops
    span = float(log_snr[0] - log_snr[stops[0]])
    kept = {0, *stops}
    for start, end in itertools.pairwise(ends):
        share = max(1, round((steps - 1) * float(log_snr[end] - log_snr[start]) / span))
        targets = torch.linspace(float(log_snr[start]), float(log_snr[end]), share + 1, dtype=torch.float64)[1:-1]
        kept.update(nearest_timesteps(log_snr, targets))
    return torch.tensor(sorted(kept, reverse=True), dtype=torch.long)


def _mean_over_ranks(parameters: list[torch.Tensor], world: int) -> None:
    """Each gradient averaged over the ranks, as DDP averages the generator's."""
    if world > 1:
        grads = [p.grad for p in parameters if p.grad is not None]
        torch._foreach_div_(grads, world)
        for grad in grads:
            dist.all_reduce(grad)


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """``module`` without parameter gradients inside the block (gradients still flow through it)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)
