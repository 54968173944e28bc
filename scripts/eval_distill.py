"""Score distilled students against their teacher on the digits, on the same seeds and judge.

For each step count S (default 1, 2, 4, 8): the teacher's DDIM (eta 0, its config's spacing) and
DPM-Solver++(2M) (logsnr spacing), each guided as `ddim sample` guides it, and every student run
given (progressive: the round that samples with S steps; consistency: its S-step sampler); and the
teacher's DDIM at 50 steps as the reference. Judged like scripts/eval_digits.py: confident =
classifier p > 0.8, PCA Fréchet distance (real held-out digits: 0.96 and 13). A guided teacher
evaluates the network twice per step (conditional and null label, batched); a student once.

Each student's wall time (its train.log's "finished at step ... in X s") is printed as a multiple
of the teacher's training, read the same way; the two are comparable only when both ran on the
same quiet machine (the device each log names is printed beside them).

With --per-class, every row also samples 500 images asked class k (50 per class) and reports the
fraction judged k (in_class).

One set of 500 is one draw: the teacher's own PCA-FD moves from 14.5 to 20.0 between sets of 500
seeds. With --sets K every row samples K consecutive sets of --n seeds (the first is the set --sets 1
scores) and reports the mean over the sets with its standard error, the mean gap to the reference
on the same seeds with its standard error (each set's luck is shared by the two and cancels in the
difference), and the score of all K x n samples pooled.

Usage:
  python scripts/eval_distill.py runs/digits --students runs/digits-progressive-S4,runs/digits-consistency-S1
  python scripts/eval_distill.py runs/digits --students runs/digits-progressive-S4 --steps 4 --per-class \\
      --json scores.jsonl --plot docs/distill-quality.png
  python scripts/eval_distill.py runs/digits --students runs/digits-dmd-S1 --steps 1 --sets 10
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_digits import DigitJudge, to_digit_scale  # noqa: E402


def sample_rows(
    loaded, spec, *, n: int, seed: int, classes: list[int] | None, guidance: float, rescale: float, unconditional=False
):
    """Images as `ddim sample` makes them (each seed draws its x_T, then its class; ``unconditional``:
    the null label, as `--unconditional`)."""
    from ddim_cli.jobs.sample import generate
    from ddim_cli.models import class_labels, noise_model
    from ddim_cli.seeding import seeded_noise

    x_T, generators = seeded_noise(loaded.image_shape, list(range(seed, seed + n)))
    labels = class_labels(loaded, generators, classes=classes, unconditional=unconditional)
    w = guidance if labels is not None else 0.0
    make_eps = noise_model(loaded, guidance=w, guidance_rescale=rescale, precision="fp32")
    images, seconds = generate(loaded, make_eps, spec, x_T, generators, labels=labels, batch_size=250)
    return images, seconds


def set_scores(judge, x: np.ndarray, size: int) -> list[dict]:
    """The judge's scores of each consecutive set of ``size`` samples in ``x`` (a last, shorter
    set is left out: PCA-FD depends on the sample count)."""
    return [judge.score(x[start : start + size]) for start in range(0, len(x) - size + 1, size)]


def mean_and_error(values) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample standard deviation over sqrt(n))."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def paired_gap(scores, reference) -> tuple[float, float]:
    """Mean and standard error of ``scores - reference``, set by set, where both were scored on the
    same seeds' sets."""
    return mean_and_error(np.asarray(scores, dtype=float) - np.asarray(reference, dtype=float))


def rows_for(teacher, students: list, steps: int) -> list[tuple[str, object, object, float, float, int]]:
    """(name, loaded, spec, guidance, rescale, network calls per image)."""
    from ddim_cli.models import SamplerSpec, student_for_steps

    cfg = teacher.config.sample
    guided = teacher.config.model.num_classes is not None and cfg.guidance > 0
    per_step = 2 if guided else 1
    rows = [
        (
            f"teacher ddim S={steps}",
            teacher,
            SamplerSpec("ddim", steps, 0.0, cfg.skip, clip_x0=cfg.clip_x0),
            cfg.guidance,
            cfg.guidance_rescale,
            per_step * steps,
        ),
    ]
    if steps > 1:
        rows.append(
            (
                f"teacher dpm++2m S={steps}",
                teacher,
                SamplerSpec("dpm++2m", steps, 0.0, "logsnr", clip_x0=cfg.clip_x0),
                cfg.guidance,
                cfg.guidance_rescale,
                per_step * steps,
            )
        )
    for student in students:
        distilled = student.config.distill
        try:
            chosen = student_for_steps(student, steps)
        except Exception as error:  # a run without a student for this count: say so, go on
            print(f"note: {student.run_dir}: {error}", file=sys.stderr)
            continue
        spec = SamplerSpec(
            distilled.sampler, steps, 0.0, chosen.config.distill.spacing, clip_x0=chosen.config.sample.clip_x0
        )
        rows.append((f"{student.run_dir.name} S={steps}", chosen, spec, 0.0, 0.0, steps))
    return rows


def wall_time(run_dir: Path) -> tuple[float, str] | None:
    """Seconds and device of a run's whole training, from its train.log (None if it did not finish
    in one go: a resumed run's time is split over its processes)."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    text = log.read_text()
    finished = re.findall(r"finished at step \d+: \d+ steps in (\d+) s, \d+ images/s on (.+)", text)
    if not finished or "resuming at" in text:
        return None
    seconds, device = finished[-1]
    return float(seconds), device


def report_wall_times(teacher, students) -> None:
    base = wall_time(teacher.run_dir)
    if base is None:
        print(f"note: {teacher.run_dir} has no single finished training in its train.log", file=sys.stderr)
        return
    print(f"teacher training: {base[0]:.0f} s on {base[1]}")
    for student in students:
        own = wall_time(student.run_dir)
        if own is None:
            print(f"{student.run_dir.name}: no single finished distillation in its train.log")
            continue
        same = "" if own[1] == base[1] else f" (on {own[1]}: another device, not comparable)"
        print(f"{student.run_dir.name}: {own[0]:.0f} s, {own[0] / base[0]:.2f}x the teacher's training{same}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", type=Path, help="the teacher's run directory or checkpoint")
    parser.add_argument("--students", default="", help="comma-separated distillation run directories")
    parser.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sets", type=int, default=1, help="score K consecutive sets of --n seeds: mean, standard error, pooled"
    )
    parser.add_argument("--per-class", action="store_true", help="also score --class k for every k (n // 10 each)")
    parser.add_argument("--json", type=Path, help="append every row here as a JSON line")
    parser.add_argument("--plot", type=Path, help="draw PCA-FD against network calls per image here (PNG)")
    parser.add_argument(
        "--picture",
        type=Path,
        help="a grid of the same 12 seeds: teacher DDIM at the first --steps, every student "
        "there, teacher DDIM at 50 steps (one row each)",
    )
    args = parser.parse_args(argv)
    if args.n < 2 or args.sets < 1:
        parser.error("--n must be at least 2 and --sets at least 1")
    from ddim_cli.models import SamplerSpec, load_model, resolve_checkpoint

    judge = DigitJudge()
    teacher = load_model(resolve_checkpoint(args.teacher)[0])
    students = [load_model(resolve_checkpoint(Path(s))[0]) for s in args.students.split(",") if s]
    cfg = teacher.config.sample
    plan = [
        (
            "teacher ddim S=50 (reference)",
            teacher,
            SamplerSpec("ddim", 50, 0.0, cfg.skip, clip_x0=cfg.clip_x0),
            cfg.guidance,
            cfg.guidance_rescale,
            (2 if cfg.guidance else 1) * 50,
        )
    ]
    for steps in [int(s) for s in args.steps.split(",")]:
        plan += rows_for(teacher, students, steps)

    report_wall_times(teacher, students)
    results, reference = [], None
    header = f"{'samples':<34} {'calls':>5} {'confident':>9} {'pca_fd':>7} {'in_class':>8} {'s/image':>8}"
    if args.sets > 1:
        header += f" {'fd_se':>6} {'gap':>6} {'gap_se':>6} {'pooled':>7}"
    print(header)
    for name, loaded, spec, w, phi, calls in plan:
        images, seconds = sample_rows(
            loaded, spec, n=args.n * args.sets, seed=args.seed, classes=None, guidance=w, rescale=phi
        )
        x = to_digit_scale(images)
        per_set = set_scores(judge, x, args.n)
        fds = [s["pca_fd"] for s in per_set]
        # every figure the judge gives, as the mean over the sets (one set: its own scores)
        scores = {key: float(np.mean([s[key] for s in per_set])) for key in per_set[0] if key != "n"}
        scores["n"] = args.n
        if args.sets > 1:
            if reference is None:  # the first row: the teacher's 50 steps
                reference = fds
            gap, gap_se = paired_gap(fds, reference)
            scores |= {
                "pca_fd_sets": fds,
                "pca_fd_se": mean_and_error(fds)[1],
                "gap_to_reference": gap,
                "gap_se": gap_se,
                "pca_fd_pooled": judge.score(x)["pca_fd"],
            }
        if args.per_class:
            classes = [k for k in range(10) for _ in range(args.n // 10)]
            asked, _ = sample_rows(
                loaded, spec, n=len(classes), seed=args.seed, classes=classes, guidance=w, rescale=phi
            )
            scores["in_class"] = judge.score(to_digit_scale(asked), np.array(classes))["in_class"]
        row = {"samples": name, "steps": spec.steps, "calls": calls, "seconds_per_image": seconds, **scores}
        results.append(row)
        in_class = f"{scores['in_class']:.3f}" if "in_class" in scores else ""
        line = f"{name:<34} {calls:>5} {scores['confident']:>9.3f} {scores['pca_fd']:>7.1f} {in_class:>8}"
        line += f" {seconds:>8.4f}"
        if args.sets > 1:
            line += (
                f" {scores['pca_fd_se']:>6.2f} {scores['gap_to_reference']:>+6.2f} {scores['gap_se']:>6.2f}"
                f" {scores['pca_fd_pooled']:>7.2f}"
            )
        print(line, flush=True)
    if args.json:
        with open(args.json, "a") as handle:
            for row in results:
                handle.write(json.dumps({"teacher": str(args.teacher), **row}) + "\n")
    if args.plot:
        plot(results, args.plot)
    if args.picture:
        steps = int(args.steps.split(",")[0])
        names = [f"teacher ddim S={steps}"] + [f"{student.run_dir.name} S={steps}" for student in students]
        chosen = [row for row in plan if row[0] in names] + plan[:1]
        picture(chosen, args.picture, args.seed)
    return 0


def picture(rows, path: Path, seed: int, count: int = 12) -> None:
    from ddim_cli.images import save_grid

    images = [
        sample_rows(loaded, spec, n=count, seed=seed, classes=None, guidance=w, rescale=phi)[0]
        for _, loaded, spec, w, phi, _ in rows
    ]
    save_grid(torch.cat(images).clamp(-1, 1), path, nrow=count)
    from PIL import Image

    with Image.open(path) as grid:  # 16x16 digits: shown 4x, each pixel a block
        enlarged = grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST)
    enlarged.save(path)
    print(f"wrote {path}: rows " + " | ".join(name for name, *_ in rows))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for row in results:
        if "reference" not in row["samples"]:
            groups.setdefault(row["samples"].rsplit(" S=", 1)[0], []).append(row)
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, rows in groups.items():
        rows.sort(key=lambda r: r["calls"])
        axis.plot([r["calls"] for r in rows], [r["pca_fd"] for r in rows], marker="o", label=name)
    reference = next((r for r in results if "reference" in r["samples"]), None)
    if reference is not None:
        axis.axhline(
            reference["pca_fd"], color="gray", linestyle="--", label=f"teacher ddim S=50 ({reference['calls']} calls)"
        )
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("network evaluations per image")
    axis.set_ylabel("PCA Fréchet distance (lower is better)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
