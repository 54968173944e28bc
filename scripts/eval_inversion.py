"""Score `ddim invert` on real digits: plain, exact and null-text inversion, in and out of distribution.

Takes 40 real digits the judge of eval_digits.py did not fit on, the first 4 of each class in its
held-out order, and prepares them two ways: upscaled 8x8 -> 16x16 nearest-neighbour, as the
quickstart trains on them, and bilinearly (smooth images, unlike the training data, as a user's own
scans would be). Each is inverted and reconstructed as `ddim invert` does with its defaults; reported
per setting: the mean and largest per-image MSE on [-1, 1], how many images exceed 1e-4 and 1e-3,
and for --exact the model calls per step and image (its checks included) and how many images the
report says missed --tol. Null-text inversion (30 Adam steps with gradients per step and image, 11x the
time of --exact) inverts the first digit of each class upscaled nearest-neighbour and the first 2 of
each class upscaled bilinearly (10 and 20 of the 40).

Usage:
  python scripts/eval_inversion.py runs/digits
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from eval_digits import DigitJudge

PER_CLASS = 4
# Null-text rows invert the first of each class's PER_CLASS digits: one in distribution, two unlike it.
NULL_TEXT_PER_CLASS = {"nearest": 1, "bilinear": 2}


def inversion_digits(judge: DigitJudge) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({"nearest": images, "bilinear": images}, labels)``: 40 held-out digits in [-1, 1], 16x16."""
    from sklearn.datasets import load_digits

    held, labels = judge.held_out_index, judge.held_out_labels
    chosen = [i for k in range(10) for i in [j for j, y in zip(held, labels, strict=True) if y == k][:PER_CLASS]]
    digits = load_digits()
    small = torch.tensor(digits.images[chosen], dtype=torch.float32).unsqueeze(1) / 16.0
    kinds = {
        "nearest": F.interpolate(small, size=(16, 16), mode="nearest"),
        "bilinear": F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False),
    }
    return {k: v.clamp(0, 1) * 2 - 1 for k, v in kinds.items()}, torch.as_tensor(digits.target[chosen])


def _errors(name: str, originals: torch.Tensor, reconstructions: torch.Tensor, **extra) -> dict:
    mse = (reconstructions - originals).pow(2).flatten(1).mean(1)
    return {
        "name": name,
        "mean_mse": float(mse.mean()),
        "max_mse": float(mse.max()),
        "over_1e-4": int((mse > 1e-4).sum()),
        "over_1e-3": int((mse > 1e-3).sum()),
        **extra,
    }


def inversion_scores(loaded, judge: DigitJudge, echo=None, kinds=("nearest", "bilinear")) -> list[dict]:
    """Rows ``{"name", "mean_mse", "max_mse", "over_1e-4", "over_1e-3"}`` (and ``calls_per_step``,
    ``missed`` for --exact): each setting as `ddim invert` runs it by default, for the digits
    upscaled each of these ways."""
    from ddim_cli.jobs.invert import invert_images, invert_null_text
    from ddim_cli.jobs.sample import generate
    from ddim_cli.models import SamplerSpec, noise_model

    prepared, labels = inversion_digits(judge)
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        if echo:
            echo(row)

    unguided = noise_model(loaded, precision="fp32")
    for kind in kinds:
        originals = prepared[kind]
        settings = [(10, False), (20, False), (50, False), (10, True), (20, True)] if kind == "nearest" else []
        settings += [] if kind == "nearest" else [(10, False), (10, True)]
        for steps, exact in settings:
            spec = SamplerSpec("ddim", steps, 0.0, loaded.config.sample.skip, clip_x0=False)
            report: list = []
            latents = invert_images(loaded, unguided, originals, spec, batch_size=64, exact=exact, report=report)
            unused = [torch.Generator() for _ in latents]  # eta = 0 draws no noise
            recon, _ = generate(loaded, unguided, spec, latents, unused, batch_size=64)
            extra = {}
            if exact:
                calls = sum(image.model_calls for image in report) / len(report) / steps
                extra = {"calls_per_step": calls, "missed": sum(not image.converged for image in report)}
            add(_errors(f"{kind} {'exact' if exact else 'plain'} S={steps}", originals, recon, **extra))
        # Guided by each digit's own class at w = 3, 20 steps: plain, then null-text with an exact pivot.
        spec = SamplerSpec("ddim", 20, 0.0, loaded.config.sample.skip, clip_x0=False)
        if kind == "nearest":
            guided = noise_model(loaded, guidance=3.0, guidance_rescale=loaded.config.sample.guidance_rescale)
            latents = invert_images(loaded, guided, originals, spec, labels=labels, batch_size=64)
            unused = [torch.Generator() for _ in latents]
            recon, _ = generate(loaded, guided, spec, latents, unused, labels=labels, batch_size=64)
            add(_errors(f"{kind} guided w=3 S=20", originals, recon))
        few = [k * PER_CLASS + j for k in range(10) for j in range(NULL_TEXT_PER_CLASS[kind])]
        for exact in (False, True) if kind == "nearest" else (True,):
            fitted = invert_null_text(
                loaded, originals[few], spec, labels[few], guidance=3.0, batch_size=64, exact=exact
            )
            add(_errors(f"{kind} null-text{' exact' if exact else ''} w=3 S=20", originals[few], fitted.reconstruction))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the quickstart checkpoint or run directory")
    args = parser.parse_args(argv)

    from ddim_cli.models import load_model, resolve_checkpoint

    loaded = load_model(resolve_checkpoint(args.run)[0])
    print(f"{PER_CLASS * 10} held-out digits each way (null-text: 10 and 20), {loaded.checkpoint}")
    print(f"{'setting':<34} {'mean MSE':>9} {'max MSE':>9} {'>1e-4':>6} {'>1e-3':>6} {'calls/step':>10} {'missed':>6}")

    def echo(r: dict) -> None:
        calls = f"{r['calls_per_step']:>10.2f} {r['missed']:>6}" if "calls_per_step" in r else ""
        counts = f"{r['over_1e-4']:>6} {r['over_1e-3']:>6}"
        print(f"{r['name']:<34} {r['mean_mse']:>9.3g} {r['max_mse']:>9.3g} {counts} {calls}", flush=True)

    inversion_scores(loaded, DigitJudge(), echo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
