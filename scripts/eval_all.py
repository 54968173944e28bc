"""The quality gate: re-measure every figure README, docs/ and BENCHMARKS.md promise for the digits quickstart.

Runs the judges of eval_digits.py (sampling at 20/50/200 steps, --unconditional, --class k),
eval_inversion.py (plain, exact and null-text inversion of in-distribution and bilinear-upscaled
digits), eval_edits.py (DDIB, null-text and SDEdit edits) and eval_restore.py (inpainting, x4
super-resolution, denoising) on a trained quickstart run, compares every figure with the committed
baseline (scripts/gate_baseline.json: each figure's value, which way is better, its tolerance and,
for the goals issues set, a hard limit), prints a table and exits 1 if any figure regressed.

It takes about 13 minutes on 2 idle AVX2 CPU cores: too slow for CI. Run it after any change to training, the
U-Net, a sampler, a default or a config, on a freshly trained `bash scripts/quickstart.sh`, and put
what it printed in your note. The quickstart figures of README, docs/ and BENCHMARKS.md come from its last run.

Usage:
  python scripts/eval_all.py runs/digits                        # all groups; exit 1 on a regression
  python scripts/eval_all.py runs/digits --groups inversion     # some of: sampling,inversion,edits,restoration
  python scripts/eval_all.py runs/digits --json figures.json    # also write the measured figures
  python scripts/eval_all.py runs/digits --update-baseline      # make this run the baseline (tolerances kept)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BASELINE = Path(__file__).with_name("gate_baseline.json")
GROUPS = ("sampling", "inversion", "edits", "restoration")

# Tolerances for new figures, by the figure's last name part: (better, kind, amount). "slack" allows an
# absolute change, "factor" a ratio; the n = 500 sampling scores carry about +-0.016 of seed noise, and a
# retrained model (another CPU's arithmetic) moves them more.
TOLERANCES = {
    "confident": ("higher", "slack", 0.03),
    "in_class": ("higher", "slack", 0.02),
    "balance_tv": ("lower", "slack", 0.03),
    "pca_fd": ("lower", "factor", 1.35),
    "mean_mse": ("lower", "factor", 2.0),
    "max_mse": ("lower", "factor", 3.0),
    "calls_per_step": ("lower", "slack", 1.0),
    "missed": ("lower", "slack", 2),
    "to_target": ("higher", "slack", 0.05),
    "mse_source": ("lower", "factor", 1.25),
    "psnr": ("higher", "slack", 0.5),
    "read": ("higher", "slack", 0.05),
    "obs_rmse": ("lower", "slack", 1e-6),  # noiseless observations are kept to float rounding
}


def measure(run: Path, groups: list[str], echo=print) -> dict[str, float]:
    """Every figure of the chosen groups, by name (e.g. ``sample.default.S50.confident``)."""
    from eval_digits import DigitJudge, sample_checkpoint, to_digit_scale
    from eval_edits import METHODS, edit_scores
    from eval_inversion import inversion_scores
    from eval_restore import SETTINGS, restore_scores

    from ddim_cli.models import load_model, resolve_checkpoint

    loaded = load_model(resolve_checkpoint(run)[0])
    judge = DigitJudge()
    figures: dict[str, float] = {}
    for group in groups:
        start = time.perf_counter()
        if group == "sampling":
            for mode, steps, n in [
                ("default", 50, 500),
                ("unconditional", 50, 500),
                ("per-class", 50, 500),
                ("default", 20, 300),
                ("default", 200, 300),
            ]:
                images, asked = sample_checkpoint(run, mode, steps, n, 0, None)
                scores = judge.score(to_digit_scale(images), asked)
                for key in ("confident", "pca_fd", "balance_tv", "in_class"):
                    if key in scores and not (mode == "per-class" and key == "balance_tv"):
                        figures[f"sample.{mode}.S{steps}.{key}"] = scores[key]
        elif group == "inversion":
            for row in inversion_scores(loaded, judge):
                for key in ("mean_mse", "max_mse", "calls_per_step", "missed"):
                    if key in row:
                        figures[f"invert.{_slug(row['name'])}.{key}"] = row[key]
        elif group == "edits":
            methods = [m for m in METHODS if "plain inversion" not in m]
            for row in edit_scores(loaded, judge, 100, 20, [loaded.config.sample.guidance], methods):
                if not row["name"].startswith("fresh"):
                    for key in ("to_target", "mse_source"):
                        figures[f"edit.{_slug(row['name'].rsplit(', w=', 1)[0])}.{key}"] = row[key]
        elif group == "restoration":
            for row in restore_scores(loaded, judge, 100, 50, ["inpaint", "sr4", "denoise0.3"], SETTINGS):
                if row["setting"].startswith(("ddnm", "repaint")):
                    noisy = row["task"].startswith("denoise")  # its observation error is the noise, by design
                    for key in ("psnr", "read") + (() if noisy else ("obs_rmse",)):
                        if row[key] is not None:
                            figures[f"restore.{row['task']}.{_slug(row['setting'])}.{key}"] = row[key]
        else:
            raise ValueError(f"unknown group {group!r}; choose from {', '.join(GROUPS)}")
        echo(f"measured {group} in {time.perf_counter() - start:.0f} s", flush=True)
    return figures


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9=.+-]+", "-", name.lower().replace("->", "to")).strip("-")


@dataclass(frozen=True)
class Verdict:
    name: str
    baseline: float | None
    measured: float | None
    allowed: float | None  # the worst value that still passes
    status: str  # ok, REGRESSED, missing (a baseline figure of a group that ran, not measured), new


def judge_figures(baseline: dict, measured: dict[str, float], groups: list[str]) -> list[Verdict]:
    """Each baseline figure of the groups that ran against its measurement, then any new figure."""
    prefixes = tuple(
        {"sampling": "sample.", "inversion": "invert.", "edits": "edit.", "restoration": "restore."}[g] for g in groups
    )
    verdicts = []
    for name, spec in baseline["figures"].items():
        if not name.startswith(prefixes):
            continue
        allowed = allowed_value(spec)
        value = measured.get(name)
        if value is None:
            verdicts.append(Verdict(name, spec["value"], None, allowed, "missing"))
            continue
        worse = value > allowed if spec["better"] == "lower" else value < allowed
        verdicts.append(
            Verdict(name, spec["value"], value, allowed, "REGRESSED" if worse or math.isnan(value) else "ok")
        )
    verdicts += [Verdict(n, None, v, None, "new") for n, v in measured.items() if n not in baseline["figures"]]
    return verdicts


def allowed_value(spec: dict) -> float:
    """The worst passing value: the baseline moved by its tolerance, and never past a hard ``limit``."""
    value, lower = spec["value"], spec["better"] == "lower"
    if "factor" in spec:
        allowed = value * spec["factor"] if lower else value / spec["factor"]
    else:
        allowed = value + spec["slack"] if lower else value - spec["slack"]
    if "limit" in spec:
        allowed = min(allowed, spec["limit"]) if lower else max(allowed, spec["limit"])
    return allowed


def updated_baseline(baseline: dict, measured: dict[str, float], about: str) -> dict:
    """The baseline with this run's values; tolerances and limits are kept, new figures get TOLERANCES'."""
    figures = dict(baseline.get("figures", {}))
    for name, value in measured.items():
        spec = dict(figures.get(name, {}))
        if not spec:
            better, kind, amount = TOLERANCES[name.rsplit(".", 1)[1]]
            spec = {"better": better, kind: amount}
        figures[name] = {"value": value, **{k: v for k, v in spec.items() if k != "value"}}
    return {**baseline, "about": about, "figures": figures}


def print_table(verdicts: list[Verdict]) -> None:
    print(f"{'figure':<64} {'baseline':>10} {'measured':>10} {'allowed':>10}  status")
    for v in verdicts:
        cells = [f"{x:>10.4g}" if x is not None else " " * 10 for x in (v.baseline, v.measured, v.allowed)]
        print(f"{v.name:<64} {' '.join(cells)}  {v.status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a trained quickstart run directory or checkpoint")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="the baseline to compare with")
    parser.add_argument("--json", type=Path, help="also write the measured figures here")
    parser.add_argument("--update-baseline", metavar="ABOUT", help="write this run into --baseline, described so")
    args = parser.parse_args(argv)
    groups = args.groups.split(",")
    if unknown := [g for g in groups if g not in GROUPS]:
        parser.error(f"unknown group {unknown[0]!r}; choose from {', '.join(GROUPS)}")
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else {"figures": {}}

    measured = measure(args.run, groups)
    if args.json:
        args.json.write_text(json.dumps(measured, indent=1) + "\n")
    verdicts = judge_figures(baseline, measured, groups)
    print_table(verdicts)
    if args.update_baseline:
        args.baseline.write_text(
            json.dumps(updated_baseline(baseline, measured, args.update_baseline), indent=1) + "\n"
        )
        print(f"wrote {args.baseline}")
        return 0
    failed = [v for v in verdicts if v.status in ("REGRESSED", "missing")]
    print(f"quality gate: {len(verdicts) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
