"""Score class-to-class edits of real digits: is the edit the target class, and is it still its source?

Takes real held-out digits (the judge's split, see eval_digits.py), gives each a target class
other than its own (label + 1 + i mod 9, so every pair occurs), edits them with each method and
reports per method:
  to_target   fraction the judge's classifier puts in the target class
  mse_source  mean per-dimension MSE to the source image on [-1, 1] (16x16)
  and, as the yardstick, a fresh sample of the target class (same seeds): how far an edit that
  ignores its source would be.
Null-text edits fit 30 Adam steps with gradients per step and image (9x the time of a
DDIB edit), so they edit only the first 40 of the digits.

Usage:
  python scripts/eval_edits.py runs/digits --n 100 --steps 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from eval_digits import DigitJudge, to_digit_scale

METHODS = {
    "ddib null -> target": {"method": "ddib"},
    "ddib source -> target": {"method": "ddib", "from_source": True},
    "ddib source -> target (plain inversion)": {"method": "ddib", "from_source": True, "exact": False},
    "ddib null-text source -> target": {"method": "ddib", "from_source": True, "null_text": True},
    "sdedit strength 0.5": {"method": "sdedit", "strength": 0.5},
    "sdedit strength 0.7": {"method": "sdedit", "strength": 0.7},
}
NULL_TEXT_N = 40  # digits that the null-text rows edit: the first of the --n


def edit_scores(
    loaded,
    judge: DigitJudge,
    n: int,
    steps: int,
    guidance: list[float],
    methods: list[str],
    echo=None,
    yardstick: bool = True,
) -> list[dict]:
    """One row per (guidance, method), and (with ``yardstick``) a fresh sample of the target per
    guidance: ``{"name", "to_target", "kept_source", "mse_source"}``."""
    from ddim_cli.data import DigitsDataset
    from ddim_cli.jobs.edit import edit_images
    from ddim_cli.jobs.sample import generate
    from ddim_cli.models import SamplerSpec, noise_model
    from ddim_cli.seeding import seeded_noise

    torch.manual_seed(0)  # nothing here should draw from it; it pins anything that does
    chosen = judge.held_out_index[:n]
    sources = DigitsDataset(loaded.config.data).images[chosen]
    labels = torch.as_tensor(judge.held_out_labels[:n], dtype=torch.long)
    targets = (labels + 1 + torch.arange(n) % 9) % 10
    x_T, generators = seeded_noise(loaded.image_shape, list(range(n)))
    rows = []

    def report(name: str, images: torch.Tensor) -> None:
        m = len(images)  # the first m digits
        predicted = judge.classifier.predict(to_digit_scale(images))
        row = {
            "name": name,
            "to_target": float((predicted == targets[:m].numpy()).mean()),
            "kept_source": float((predicted == labels[:m].numpy()).mean()),
            "mse_source": float((images.clamp(-1, 1) - sources[:m]).pow(2).flatten(1).mean(1).mean()),
        }
        rows.append(row)
        if echo:
            echo(row)

    phi = loaded.config.sample.guidance_rescale  # as the CLI's edit and sample
    clip_x0 = loaded.config.sample.clip_x0  # as the CLI's sample, and its edit for SDEdit (DDIB never clips)
    for w in guidance:
        spec = SamplerSpec("ddim", steps, 0.0, loaded.config.sample.skip, clip_x0=clip_x0)
        make_eps = noise_model(loaded, guidance=w, guidance_rescale=phi)
        if yardstick:
            fresh, _ = generate(loaded, make_eps, spec, x_T, generators, labels=targets, batch_size=250)
            report(f"fresh sample of the target, w={w:g}", fresh)
        for name in methods:
            options = dict(METHODS[name])
            if options.pop("null_text", False) and not w:
                continue
            from_source = options.pop("from_source", False)
            m = min(n, NULL_TEXT_N) if "null-text" in name else n
            edit_spec = SamplerSpec(
                "ddim", steps, 0.0, loaded.config.sample.skip, clip_x0=clip_x0 and options["method"] == "sdedit"
            )
            edited = edit_images(
                loaded,
                sources[:m],
                edit_spec,
                targets[:m],
                from_labels=labels[:m] if from_source else None,
                guidance=w,
                guidance_rescale=phi,
                noise=x_T[:m],
                null_text="null-text" in name,
                batch_size=250,
                **options,
            )
            report(f"{name}, w={w:g}", edited)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a class-conditional checkpoint or run directory")
    parser.add_argument("--n", type=int, default=100, help="how many held-out digits to edit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--guidance", default=None, help="comma-separated guidance values to try (default: the config's, and 1)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names (see source)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.methods.split(",") if name not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from: {', '.join(METHODS)}")

    from ddim_cli.models import load_model, resolve_checkpoint

    loaded = load_model(resolve_checkpoint(args.run)[0])
    guidance = args.guidance or f"{loaded.config.sample.guidance:g},1"
    print(f"{args.n} held-out digits, {args.steps} DDIM steps, {loaded.checkpoint}")
    print(f"{'method':<44} {'to_target':>9} {'kept_source':>11} {'mse_source':>10}")

    def echo(row: dict) -> None:
        print(f"{row['name']:<44} {row['to_target']:>9.3f} {row['kept_source']:>11.3f} {row['mse_source']:>10.4f}")

    methods = args.methods.split(",")
    edit_scores(loaded, DigitJudge(), args.n, args.steps, [float(v) for v in guidance.split(",")], methods, echo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
