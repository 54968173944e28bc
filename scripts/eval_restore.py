"""Score `ddim restore` on real digits against classical baselines (what docs/restoration.md's table reports).

Takes real digits the judge of eval_digits.py did not fit on (the diffusion model may have trained
on them: the quickstart trains on all 1797), degrades each as `ddim restore --degrade` does, and
restores it with the library. Reports per task and setting the mean PSNR against the originals
(dB on [-1, 1], 16x16) and the observation error (RMS of A x - y over observed values), and:
  inpainting (bottom half missing): how often the judge's classifier reads the completion as the
    original digit (and the original itself, for reference);
  x4 super-resolution (16 -> 4 -> 16): bicubic and nearest upscaling;
  denoising (sigma 0.3): the noisy input and the best Gaussian blur (its width chosen on the
    same images, an oracle choice that favours the baseline).
RePaint's time travel (jump 10 x 10) costs 7x a DDNM run, so it restores the first 50 digits.

Usage:
  python scripts/eval_restore.py runs/digits --n 100 --steps 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from eval_digits import DigitJudge, to_digit_scale
from torchvision.transforms.functional import gaussian_blur

REPAINT_N = 50  # digits that the repaint rows restore: the first of the --n
# (task, method, eta, jump, resample, use the true class)
SETTINGS = [
    ("inpaint", "ddnm", 0.0, 1, 1, False),
    ("inpaint", "ddnm", 1.0, 1, 1, False),
    ("inpaint", "ddnm", 1.0, 5, 3, False),
    ("inpaint", "repaint", 1.0, 10, 10, False),
    ("inpaint", "ddnm", 1.0, 1, 1, True),
    ("sr4", "ddnm", 0.0, 1, 1, False),
    ("sr4", "ddnm", 1.0, 1, 1, False),
    ("sr4", "ddnm", 1.0, 5, 3, False),
    ("denoise0.3", "ddnm", 0.0, 1, 1, False),
    ("denoise0.3", "ddnm", 1.0, 1, 1, False),
]


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of PSNR in dB on [-1, 1] (peak-to-peak 2)."""
    mse = (x.clamp(-1, 1) - reference).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4 / mse)).mean())


def restore_scores(loaded, judge: DigitJudge, n: int, steps: int, tasks: list[str], settings=SETTINGS, echo=None):
    """One row per task and setting: ``{"task", "setting", "psnr", "obs_rmse", "read"}`` (None where a
    figure does not apply; ``read``: how often the judge reads the result as the original digit)."""
    from ddim_cli.data import DigitsDataset
    from ddim_cli.jobs.restore import degrade_images, restore_images
    from ddim_cli.models import SamplerSpec, noise_model
    from ddim_cli.restoration import Denoising, Inpainting, SuperResolution, mask_preset

    torch.manual_seed(0)  # nothing here should draw from it; it pins anything that does
    originals = DigitsDataset(loaded.config.data).images[judge.held_out_index[:n]]
    labels = torch.as_tensor(judge.held_out_labels[:n], dtype=torch.long)
    size = loaded.config.data.image_size
    degradations = {
        "inpaint": Inpainting(mask_preset("bottom-half", size, size)),
        "sr4": SuperResolution(4),
        "denoise0.3": Denoising(0.3),
    }
    rows = []

    def read_as_truth(images: torch.Tensor) -> float:  # of the first len(images) digits
        return float((judge.classifier.predict(to_digit_scale(images)) == labels[: len(images)].numpy()).mean())

    def row(task: str, setting: str, quality: float | None = None, rmse: float | None = None, read=None) -> None:
        rows.append({"task": task, "setting": setting, "psnr": quality, "obs_rmse": rmse, "read": read})
        if echo:
            echo(rows[-1])

    for task in tasks:
        A = degradations[task]
        y = degrade_images(A, originals, seed=0)
        if task == "inpaint":
            row(task, "original", read=read_as_truth(originals))
            background = torch.where(A.known, y, torch.full_like(y, -1.0))
            row(
                task, "missing half left at the background", psnr(background, originals), read=read_as_truth(background)
            )
        if task == "sr4":
            for mode in ("nearest", "bicubic"):
                corners = {} if mode == "nearest" else {"align_corners": False}
                row(task, f"{mode} upscaling", psnr(F.interpolate(y, scale_factor=4, mode=mode, **corners), originals))
        if task.startswith("denoise"):
            row(task, "noisy input", psnr(y, originals))
            blurs = {
                s: psnr(gaussian_blur(y, kernel_size=9, sigma=s), originals)
                for s in (0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
            }
            best = max(blurs, key=blurs.get)
            row(task, f"best Gaussian blur (sigma {best:g} px)", blurs[best])
        for setting in [s for s in settings if s[0] == task]:
            _, method, eta, jump, resample, in_class = setting
            spec = SamplerSpec("ddim", steps, eta, loaded.config.sample.skip, clip_x0=True)
            guidance = loaded.config.sample.guidance if in_class else 0.0
            m = min(n, REPAINT_N) if method == "repaint" else n
            restored = restore_images(
                loaded,
                noise_model(loaded, guidance=guidance, guidance_rescale=loaded.config.sample.guidance_rescale),
                y[:m],
                A,
                spec,
                labels=labels[:m] if in_class else None,
                method=method,
                jump=jump,
                resample=resample,
                batch_size=250,
            ).clamp(-1, 1)
            name = f"{method} eta {eta:g}" + (f" jump {jump} x {resample}" if resample > 1 else "")
            name += f" (true class, w={guidance:g})" if in_class else ""
            read = read_as_truth(restored) if task == "inpaint" else None
            rmse = float(A.observation_error(restored, y[:m]).pow(2).mean().sqrt())  # every image observes as much
            row(task, name, psnr(restored, originals[:m]), rmse, read)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the quickstart checkpoint or run directory")
    parser.add_argument("--n", type=int, default=100, help="how many held-out digits")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tasks", default="inpaint,sr4,denoise0.3", help="comma-separated subset of the tasks")
    args = parser.parse_args(argv)

    from ddim_cli.models import load_model, resolve_checkpoint

    loaded = load_model(resolve_checkpoint(args.run)[0])
    print(f"{args.n} held-out digits, {args.steps} DDIM steps, {loaded.checkpoint}")
    print(f"{'task':<11} {'setting':<42} {'PSNR dB':>8} {'obs RMSE':>9} {'read as truth':>13}")

    def echo(r: dict) -> None:
        figures = ((r["psnr"], 8, ".2f"), (r["obs_rmse"], 9, ".2g"))
        cells = [f"{v:>{w}{f}}" if v is not None else " " * w for v, w, f in figures]
        read = "" if r["read"] is None else f"{r['read']:>13.3f}"
        print(f"{r['task']:<11} {r['setting']:<42} {' '.join(cells)} {read}", flush=True)

    restore_scores(loaded, DigitJudge(), args.n, args.steps, args.tasks.split(","), echo=echo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
