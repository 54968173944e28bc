"""Few-step students of a trained diffusion model (``ddim distill``): progressive distillation
(Salimans & Ho 2022), consistency distillation (Song et al. 2023) and distribution matching
distillation (Yin et al. 2023, 2024), each an objective of the one
training loop (:mod:`ddim_cli.run_loop`), with their formulas over any teacher given as an
``x0_model(z, t)``:

- :mod:`.core`: the data prediction of eps, x0 and v outputs, and the DDIM step between two levels;
- :mod:`.progressive`, :mod:`.consistency`, :mod:`.dmd`: each method's targets and losses (students
  sample with :func:`ddim_cli.sampling.sample`, ``method="ddim"`` or ``"consistency"``);
- :mod:`.objective` and :mod:`.methods`: what the loop runs; :mod:`.students`: a student's config;
- :mod:`.run`: :func:`distill`, the run ``ddim distill`` makes.
"""

from ddim_cli.distillation.consistency import (
    consistency_function,
    consistency_grid,
    consistency_target,
    consistency_times,
    pseudo_huber,
)
from ddim_cli.distillation.core import ddim_step, output_from_x0, x0_from_output
from ddim_cli.distillation.progressive import (
    distillation_grid,
    halving_rounds,
    progressive_loss,
    progressive_target,
    truncated_snr_weight,
)
from ddim_cli.distillation.run import OBJECTIVES, DistillResult, distill
from ddim_cli.distillation.students import student_config, student_path, with_student_steps

METHODS = tuple(OBJECTIVES)

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "DistillResult",
    "consistency_function",
    "consistency_grid",
    "consistency_target",
    "consistency_times",
    "ddim_step",
    "distill",
    "distillation_grid",
    "halving_rounds",
    "output_from_x0",
    "progressive_loss",
    "progressive_target",
    "pseudo_huber",
    "student_config",
    "student_path",
    "truncated_snr_weight",
    "with_student_steps",
    "x0_from_output",
]
