"""`ddim distill` end to end on tiny models: both methods, students as models, resume and bad input."""

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from test_commands import TINY, ddim, make_run, ok

from ddim_cli.checkpoint import list_checkpoints, load_checkpoint


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A class-conditional v-prediction tiny run (T = 50) with label dropout and guidance."""
    run = tmp_path_factory.mktemp("runs") / "teacher"
    raw = json.loads(json.dumps(TINY))
    raw["model"].update(num_classes=10, prediction="v")
    raw["train"].update(label_dropout=0.5)
    raw["sample"].update(guidance=0.5)
    from ddim_cli.config import config_from_dict
    from ddim_cli.train import train

    train(config_from_dict(raw), run, device="cpu", progress=False)
    return run


SMALL = [
    "--method",  # the default depends on --steps; these tests mostly distil progressively (a later --method wins)
    "progressive",
    "--set",
    "distill.teacher_steps=8",
    "--set",
    "distill.round_steps=3",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.log_every=1",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "distill.grid_points=8",
]
# (T = 50: by default the first teacher takes 16 DDIM steps and the consistency grid has 32 points.)


def distilled(teacher, run_dir, *args):
    return ok("distill", teacher, "--steps", 2, *SMALL, "--run-dir", run_dir, *args)


def one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_progressive_distillation_writes_a_run_with_every_rounds_student(teacher, tmp_path):
    run = tmp_path / "pd"
    result = distilled(teacher, run)
    assert "students (4 steps:" in result.output and "2 steps:" in result.output
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["distill"]["method"] == "progressive" and config["distill"]["guidance"] == 0.5
    assert config["sample"] == config["sample"] | {"steps": 2, "skip": "trailing", "guidance": 0.0}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["student_steps"] for m in metrics] == [4, 4, 4, 2, 2, 2]
    assert all(m["loss"] > 0 for m in metrics)
    for steps in (4, 2):
        student = load_checkpoint(run / "students" / f"S{steps}.safetensors")
        assert student.config.distill.steps == steps and student.config.sample.steps == steps
        assert (run / "samples" / f"S{steps}-step-{3 if steps == 4 else 6:07d}.png").is_file()
    assert (run / "metrics.png").is_file() and "finished at step 6" in (run / "train.log").read_text()

    # Students are models: their own steps by default, another kept round with --steps, the rest refused.
    made = ok("sample", run, "--n", 3, "--out", tmp_path / "a.png")
    assert "ddim S=2 eta=0 of a progressive student" in made.output and "S2.safetensors" in made.output
    assert "learnt by distillation" in made.output
    assert "S4.safetensors" in ok("sample", run, "--n", 3, "--steps", 4, "--out", tmp_path / "b.png").output
    ok("sample", run, "--n", 3, "--class", 7, "--npz", tmp_path / "c.npz", "--out", tmp_path / "c.png")
    ok("sample", run, "--n", 3, "--unconditional", "--out", tmp_path / "d.png")
    line = one_line_error(ddim("sample", run, "--n", 3, "--steps", 8, "--out", tmp_path / "e.png"), 1)
    assert "has students for 4, 2 steps, not 8" in line
    assert "--guidance does not apply" in one_line_error(ddim("sample", run, "--guidance", 1), 1)
    assert "drop --sampler" in one_line_error(ddim("sample", run, "--sampler", "dpm++2m"), 2)
    for option, value in (("--eta", "0,1"), ("--skip", "quad")):  # compare once ignored both for a student
        line = one_line_error(ddim("compare", run, option, value, "--n", 2, "--out", tmp_path / "x"), 2)
        assert "a student is compared on its own grid" in line and f"drop {option}" in line
    table = ok("compare", run, "--n", 2, "--no-dpm-solver", "--out", tmp_path / "cmp").output
    rows = [
        line.split(" | ")[:3]
        for line in table.splitlines()
        if line.startswith("| teacher") or line.startswith("| student")
    ]
    assert rows == [
        ["| teacher", "ddim", "2"],
        ["| student", "ddim", "2"],
        ["| teacher", "ddim", "4"],
        ["| student", "ddim", "4"],
    ]
    for command in ("invert", "edit", "restore"):
        extra = {"edit": ["--to-class", 1], "restore": ["--sr", 2]}.get(command, [])
        line = one_line_error(ddim(command, run, tmp_path / "a.png", *extra), 1)
        assert f"ddim {command} needs the full model" in line and str(teacher) in line


def test_the_student_samples_what_its_grid_and_weights_say(teacher, tmp_path):
    """`ddim sample` of a student is plain DDIM on its trailing grid with its own (v) output."""
    from ddim_cli.models import load_model
    from ddim_cli.sampling import sample
    from ddim_cli.schedule import timesteps
    from ddim_cli.seeding import seeded_noise

    run = tmp_path / "pd"
    distilled(teacher, run)
    ok(
        "sample",
        run,
        "--n",
        2,
        "--class",
        3,
        "--save-latents",
        tmp_path / "z.npy",
        "--npz",
        tmp_path / "s.npz",
        "--out",
        tmp_path / "s.png",
    )
    student = load_model(run / "students" / "S2.safetensors")
    x_T, _ = seeded_noise(student.image_shape, [0, 1])
    labels = torch.tensor([3, 3])
    with torch.no_grad():
        images = sample(
            lambda x, t: student.model(x, t, labels),
            x_T,
            student.alpha_bars,
            timesteps(50, 2, "trailing"),
            clip_x0=student.config.sample.clip_x0,
            prediction="v",
        )
    import numpy as np

    from ddim_cli.images import to_uint8

    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], to_uint8(images))


def test_a_cosine_learning_rate_warms_up_and_decays_to_zero_in_each_round(teacher, tmp_path):
    run = tmp_path / "cosine"
    distilled(teacher, run, "--set", "distill.lr_schedule=cosine", "--set", "distill.warmup=1")
    logged = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # rounds of 3 steps: warmup to 5e-4, then cos over the 2 left (5e-4 * (1 + cos(pi / 2)) / 2), per round
    assert logged == pytest.approx([5e-4, 5e-4, 2.5e-4] * 2)
    line = one_line_error(ddim("distill", teacher, "--set", "distill.lr_schedule=linear", "--run-dir", tmp_path), 2)
    assert "distill.lr_schedule" in line and "cosine" in line


def test_tensorboard_logs_every_rounds_metrics_and_grids(teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "pd"
    distilled(teacher, run, "--set", "train.tensorboard=true")
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {event.step: event.value for event in events.Scalars("train/loss")}
    assert losses == pytest.approx({m["step"]: m["loss"] for m in logged}, rel=1e-6)
    assert {event.step: event.value for event in events.Scalars("train/lr")} == pytest.approx(
        {m["step"]: m["lr"] for m in logged}, rel=1e-6
    )
    assert sorted(event.step for tag in events.Tags()["images"] for event in events.Images(tag)) == [3, 6]


def test_consistency_distillation_samples_in_one_step_or_a_few(teacher, tmp_path):
    run = tmp_path / "cd"
    result = distilled(teacher, run, "--method", "consistency")
    assert "students (2 steps:" in result.output
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["distill"]["method"] == "consistency"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    state = load_checkpoint(list_checkpoints(run / "checkpoints")[-1], training_state=True).training_state
    assert "target" in state  # the EMA target network is part of the run's state
    assert "consistency S=2 of a consistency student" in ok("sample", run, "--n", 3, "--out", tmp_path / "a.png").output
    assert "consistency S=1" in ok("sample", run, "--n", 3, "--steps", 1, "--out", tmp_path / "b.png").output
    line = one_line_error(ddim("sample", run, "--n", 3, "--steps", 3, "--out", tmp_path / "c.png"), 1)
    assert "samples with 1, 2, 4, 8 steps, not 3" in line
    line = one_line_error(ddim("sample", run, "--n", 3, "--eta", 1, "--out", tmp_path / "c.png"), 2)
    assert "samples with the consistency chain, which takes no eta; drop --eta" in line  # once ignored


def test_without_method_distill_picks_the_method_measured_best_for_the_step_count(teacher):
    # BENCHMARKS.md: distribution matching gave the best students at 1, 2 and 4 steps; at 8 only
    # consistency was measured.
    for steps, method in ((1, "dmd"), (2, "dmd"), (4, "dmd"), (7, "consistency"), (8, "consistency")):
        result = ok("distill", teacher, "--steps", steps, "--dry-run")
        assert yaml.safe_load(result.output)["distill"]["method"] == method
    result = ok("distill", teacher, "--steps", 1, "--method", "consistency", "--dry-run")
    assert yaml.safe_load(result.output)["distill"]["method"] == "consistency"


def test_dmd_distils_a_generator_that_samples_in_its_steps_and_their_halves(teacher, tmp_path):
    run = tmp_path / "dmd"
    result = distilled(teacher, run, "--method", "dmd", "--steps", 4, "--set", "distill.regression_pairs=16")
    assert "students (4 steps:" in result.output
    log = (run / "train.log").read_text()
    assert "distribution matching distillation for 4-step sampling, 4 fake-score updates per step" in log
    state = load_checkpoint(list_checkpoints(run / "checkpoints")[-1], training_state=True).training_state
    assert {"fake", "fake_optimizer"} <= state.keys()  # the fake score is part of the run's state
    teacher_weights = load_checkpoint(list_checkpoints(teacher / "checkpoints")[-1]).ema
    assert any(not torch.equal(state["fake"][k], teacher_weights[k]) for k in teacher_weights)  # it was trained
    for steps in (4, 2, 1):
        assert (
            f"consistency S={steps} of a dmd student"
            in ok("sample", run, "--n", 3, "--steps", steps, "--out", tmp_path / "a.png").output
        )
    line = one_line_error(ddim("sample", run, "--n", 3, "--steps", 3, "--out", tmp_path / "c.png"), 1)
    assert "samples with 1, 2, 4 steps, not 3" in line
    line = one_line_error(ddim("distill", teacher, "--method", "dmd", "--set", "distill.fake_updates=0"), 2)
    assert "distill.fake_updates: must be >= 1, got 0" in line


@pytest.mark.parametrize("method", ["progressive", "consistency", "dmd"])
def test_kill_9_then_resume_gives_bit_identical_students(teacher, tmp_path, method):
    args = [
        "--steps",
        2,
        *SMALL,
        "--set",
        "distill.round_steps=4",
        "--set",
        "train.checkpoint_every=1",
        "--method",
        method,
        # dmd with every step-dependent weight on: the GAN term, a regression weight fading with the step
        # and the fake score's own (scheduled) rate
        *(
            [
                *("--set", "distill.regression_pairs=16", "--set", "distill.gan_weight=0.01"),
                *("--set", "distill.regression_schedule=cosine", "--set", "distill.fake_lr=0.001"),
            ]
            if method == "dmd"
            else []
        ),
    ]
    distilled(teacher, tmp_path / "reference", *args[2:])
    if method == "dmd":  # the start line names every term that is on
        started = (tmp_path / "reference" / "train.log").read_text()
        assert "of one batch at lr 0.001, regression weight 2 (cosine to 0), GAN term 0.01, of " in started
    command = [sys.executable, "-m", "ddim_cli", "distill", str(teacher), *map(str, args), "--no-progress"]
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    rng = random.Random(method)
    wanted = rng.randint(1, 6 if method == "progressive" else 3)
    deadline = time.monotonic() + 120
    while len(list_checkpoints(run_dir / "checkpoints")) < wanted and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    ok("distill", "--resume", run_dir)  # in this process: one start fewer
    kept = sorted(p.name for p in (tmp_path / "reference" / "students").iterdir())
    assert sorted(p.name for p in (run_dir / "students").iterdir()) == kept
    for name in kept:
        ours, theirs = (
            load_checkpoint(run_dir / "students" / name),
            load_checkpoint(tmp_path / "reference" / "students" / name),
        )
        assert all(torch.equal(ours.ema[k], theirs.ema[k]) for k in theirs.ema), name
    last = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    reference = load_checkpoint(list_checkpoints(tmp_path / "reference" / "checkpoints")[-1])
    assert all(torch.equal(last.model[k], reference.model[k]) for k in reference.model)


def test_bad_input_is_one_line_and_writes_nothing(teacher, tmp_path):
    run = tmp_path / "never"
    line = one_line_error(ddim("distill", teacher, "--method", "progressive", "--steps", 3, "--run-dir", run), 2)
    assert "--steps 3 cannot be reached by halving the teacher's 16 steps; choose one of 8, 4, 2, 1" in line
    line = one_line_error(
        ddim("distill", teacher, *SMALL[:2], "--steps", 4, "--set", "distill.teacher_steps=4", "--run-dir", run), 2
    )
    assert "distill.teacher_steps 4 equals --steps: nothing to distil" in line
    line = one_line_error(ddim("distill", teacher, "--set", "distill.teacher_steps=100", "--run-dir", run), 2)
    assert "distill.teacher_steps: must lie between distill.steps (4) and diffusion.num_timesteps (50)" in line
    line = one_line_error(ddim("distill", teacher, "--set", "distill.nonsense=1", "--run-dir", run), 2)
    assert "unknown key 'distill.nonsense'" in line
    # --set of what --method, --steps and SOURCE decide once kept the recipe of the others
    for override, message in [
        ("distill.method=progressive", "--set distill.method: give --method instead"),
        ("distill.steps=4", "--set distill.steps: give --steps instead"),
        ("distill.teacher=elsewhere.safetensors", "--set distill.teacher: the teacher is SOURCE"),
    ]:
        assert message in one_line_error(ddim("distill", teacher, "--steps", 2, "--set", override, "--run-dir", run), 2)
    unconditional = make_run(tmp_path / "uncond", prediction="v")
    line = one_line_error(ddim("distill", unconditional, "--set", "distill.guidance=1", "--run-dir", run), 2)
    assert "distill.guidance: needs a class-conditional teacher" in line
    eps = make_run(tmp_path / "eps")
    line = one_line_error(ddim("distill", eps, "--run-dir", run), 2)
    assert "needs a v- or x0-prediction teacher" in line and "--set model.prediction=v" in line
    line = one_line_error(ddim("distill", tmp_path / "nothing-here", "--run-dir", run), 1)
    for args in [(), (teacher, "--resume", run), ("--resume", run, "--resume-if-exists")]:  # as ddim train
        line = one_line_error(ddim("distill", *args), 2)
        assert "SOURCE" in line and "--resume" in line
    line = one_line_error(ddim("distill", "--resume", tmp_path / "nothing-here"), 2)
    assert "nothing-here" in line
    assert not run.exists()


@pytest.mark.faults
@pytest.mark.parametrize(("sig", "seed"), [(signal.SIGTERM, 5), (signal.SIGUSR1, 6)])
def test_a_stop_signal_to_the_whole_group_with_workers_stops_distillation_and_resume_is_bit_identical(
    teacher, tmp_path, sig, seed
):
    from test_stops import WITH_WORKERS, start, stop_group

    args = ["--steps", 2, *SMALL, "--set", "distill.round_steps=100", "--method", "consistency"]
    args += [item for key, value in WITH_WORKERS.items() for item in ("--set", f"data.{key}={value}")]
    run_dir = tmp_path / "stopped"
    process = start(["distill", teacher, *args, "--run-dir", run_dir])
    err, step = stop_group(process, run_dir, sig, random.Random(seed))
    assert f"Resume with: ddim distill --resume {run_dir}" in err

    ok("distill", "--resume", run_dir, "--set", f"distill.round_steps={step + 2}")  # in this process
    fresh = [*args[:-4], "--set", f"distill.round_steps={step + 2}", *args[-4:]]
    distilled(teacher, tmp_path / "reference", *fresh[2:])
    last = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    reference = load_checkpoint(list_checkpoints(tmp_path / "reference" / "checkpoints")[-1])
    assert last.step == reference.step == step + 2
    for ours, theirs in ((last.model, reference.model), (last.ema, reference.ema)):
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_run_resumes_only_with_its_own_command(teacher, tmp_path):
    # ddim train --resume on a student once went on training it with the denoising loss (and wrote
    # the --set into its config.yaml); ddim distill --resume on a teacher's run was an internal error.
    import shutil

    student, teacher_copy = tmp_path / "student", tmp_path / "teacher"
    distilled(teacher, student)
    shutil.copytree(teacher, teacher_copy)

    def files(run):
        return {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file() and path.name != ".lock"}

    for command, run, message in [
        ("train", student, "ddim train trains teachers: continue a distillation run with ddim distill --resume"),
        ("distill", teacher_copy, "continue a training run with ddim train --resume"),
    ]:
        before = files(run)
        line = one_line_error(ddim(command, "--resume", run, "--set", "train.steps=100"), 1)
        assert message in line
        assert files(run) == before


def test_resume_if_exists_starts_a_distillation_then_continues_it(teacher, tmp_path):
    args = ["--method", "consistency", "--run-dir", tmp_path / "run", "--resume-if-exists"]
    distilled(teacher, tmp_path / "run", *args[:2], *args[-1:], "--set", "distill.round_steps=2")
    distilled(teacher, tmp_path / "run", *args[:2], *args[-1:], "--set", "distill.round_steps=4")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "starting step 0 of 2" in log and "resuming at step 2 of 4" in log


def test_a_one_step_students_refusal_says_step_not_steps():
    from ddim_cli.distillation import consistency_times

    with pytest.raises(ValueError, match=r"a student of a 1-point grid samples with 1 step, not 2$"):
        consistency_times(1000, 1, 2)
    with pytest.raises(ValueError, match=r"samples with 1, 2 steps, not 4$"):
        consistency_times(1000, 2, 4)


def test_dmd_fake_updates_can_share_one_drawn_batch(teacher, tmp_path, monkeypatch):
    from ddim_cli.distillation import dmd

    draws, updates = [], []
    generate, update_fake = dmd.generate, dmd.update_fake_score

    def recording_generate(objective, net, labels, generator, batch, draw):
        images = generate(objective, net, labels, generator, batch, draw)
        draws.append((draw, images.detach().clone(), labels.clone()))
        return images

    def recording_update(objective, samples, labels, generator, lr, real):
        updates.append((samples.clone(), labels.clone(), len(real)))
        return update_fake(objective, samples, labels, generator, lr, real)

    monkeypatch.setattr(dmd, "generate", recording_generate)
    monkeypatch.setattr(dmd, "update_fake_score", recording_update)
    args = ["--method", "dmd", "--steps", 1, "--set", "distill.regression_pairs=16", "--set", "distill.round_steps=2"]
    args += ["--set", "distill.fake_updates=4"]
    result = distilled(teacher, tmp_path / "shared", *args, "--set", "distill.fake_batch=3")
    assert "4 fake-score updates per step on 3 of one batch" in (tmp_path / "shared" / "train.log").read_text()
    assert [d for d, *_ in draws] == ["dmd-chain-fake", "dmd-chain"] * 2, result.output  # one draw a step for all 4
    assert len(updates) == 8
    for i, (samples, labels, real) in enumerate(updates):
        _, drawn, drawn_labels = draws[2 * (i // 4)]
        rows = [next(j for j in range(len(drawn)) if torch.equal(drawn[j], sample)) for sample in samples]
        assert len(samples) == real == 3 and len(set(rows)) == 3  # three different samples of the step's draw
        assert torch.equal(labels, drawn_labels[rows])  # each with its own label
    assert len({tuple(s.flatten()[:4].tolist()) for s, *_ in updates[:4]}) > 1  # the parts differ
    draws.clear(), updates.clear()
    distilled(teacher, tmp_path / "fresh", *args, "--set", "distill.fake_batch=0")  # DMD2's way: a draw per update
    assert [d for d, *_ in draws] == ["dmd-chain-0", "dmd-chain-1", "dmd-chain-2", "dmd-chain-3", "dmd-chain"] * 2
    assert [len(samples) for samples, *_ in updates] == [8] * 8
    line = one_line_error(ddim("distill", teacher, *args, "--set", "distill.fake_batch=-1"), 2)
    assert "distill.fake_batch: must be >= 0, got -1" in line
    keys = ("method", "round_steps", "fake_batch", "lr_schedule", "gan_weight", "regression_schedule")
    # the measured recipes: few steps shorter and their later calls always anchored, no GAN term; one step
    # and two with three fake-score updates at three times the generator's rate, more steps four at twice it
    for steps, round_steps, regression, fake_updates, fake_lr in (
        (1, 1000, "cosine", 3, 9e-4),
        (2, 850, "constant", 3, 9e-4),
        (4, 850, "constant", 4, 6e-4),
    ):
        distill = yaml.safe_load(ok("distill", teacher, "--steps", steps, "--dry-run").output)["distill"]
        assert [distill[key] for key in keys] == ["dmd", round_steps, 16, "cosine", 0, regression]
        assert (distill["fake_updates"], distill["fake_lr"]) == (fake_updates, pytest.approx(fake_lr))


def test_the_quality_gate_scores_each_student_at_its_own_steps_and_only_against_its_own_teacher(teacher, tmp_path):
    import shutil
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import eval_all
    from eval_digits import DigitJudge

    run = tmp_path / "cd"
    distilled(teacher, run, "--method", "consistency")
    judge = DigitJudge.cached()
    figures = eval_all.student_figures(teacher, [run], judge)
    assert list(figures) == [
        "distill.consistency-S2.default.confident",
        "distill.consistency-S2.default.pca_fd",
        "distill.consistency-S2.per-class.in_class",
        "distill.consistency-S2.unconditional.confident",
        "distill.consistency-S2.unconditional.balance_tv",
    ]
    assert (
        all(0 <= figures[n] <= 1 for n in figures if not n.endswith("pca_fd"))
        and figures["distill.consistency-S2.default.pca_fd"] > 0
    )
    # the figures are the judge's scores of the images `ddim sample` writes for seeds 0..499
    ok("sample", run, "--n", 500, "--npz", tmp_path / "s.npz", "--out", tmp_path / "s.png")
    with np.load(tmp_path / "s.npz") as data:
        images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    from eval_digits import to_digit_scale

    from_cli = judge.score(to_digit_scale(images))
    assert from_cli["confident"] == pytest.approx(figures["distill.consistency-S2.default.confident"], abs=0.01)
    assert from_cli["pca_fd"] == pytest.approx(figures["distill.consistency-S2.default.pca_fd"], rel=0.02)  # uint8

    with pytest.raises(ValueError, match="is not a distilled student"):
        eval_all.student_figures(teacher, [teacher], judge)
    with pytest.raises(ValueError, match="two students are consistency-S2"):
        eval_all.student_figures(teacher, [run, run], judge)
    shutil.copytree(teacher, tmp_path / "another")
    with pytest.raises(ValueError, match="was distilled from .* not from"):
        eval_all.student_figures(tmp_path / "another", [run], judge)
