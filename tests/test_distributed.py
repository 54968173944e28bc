"""Generation under torchrun: two gloo ranks write the very files one process writes.

Every command is run twice, in this process and as `torchrun --nproc-per-node 2` (through
`small_fid_ddim.py` where it measures FID: the `ddim` command with the FID tests' small feature
extractor in place of Inception), and the files are compared byte for byte.
"""

import csv
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from test_commands import make_run
from test_fid import small_extractor
from test_reliability import ddim, interrupt_after
from typer.testing import CliRunner

import ddim_cli.fid as fid
from ddim_cli.cli import app

DDIM = str(Path(__file__).with_name("small_fid_ddim.py"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(autouse=True)
def small_fid(monkeypatch):
    """In this process as in `small_fid_ddim.py`: the small feature extractor stands in for Inception."""
    monkeypatch.setattr(fid, "inception_extractor", lambda weights=None, device="cpu": small_extractor)


def one_process(*args):
    """The command run in this process (a subprocess would only add torch's import time)."""
    result = CliRunner().invoke(app, [*map(str, args), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output[-2000:]
    return result


def two_ranks(*args, module: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    # As README shows it: torchrun's own options, then -m ddim_cli -- and the command (without the
    # --, torchrun's parser takes --n for an abbreviation of its own options).
    program = ["-m", "ddim_cli", "--"] if module else [DDIM, "--"]
    result = subprocess.run(
        [*launcher, *program, *map(str, args), "--no-progress", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[:6000]
    # A process group something still held after the job kept gloo's threads alive into Python's
    # shutdown, where they aborted a rank now and then ("terminate called without an active exception").
    assert "outlived destroy_process_group" not in result.stderr, result.stderr[:6000]
    return result


def assert_same_files(one: Path, two: Path, skip: tuple[str, ...] = ()) -> int:
    """Every file under ``one`` is under ``two`` with the same bytes, and no other; returns the count.

    A .csv's numbers, computed from the unquantised outputs, need only agree to float rounding: the
    ranks run smaller batches than one process, which moves float32 results in their last bits.
    """
    names = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.name not in skip)
    assert names == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and p.name not in skip)
    for name in names:
        if name.suffix == ".csv":
            assert_same_table(one / name, two / name)
        else:
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    return len(names)


def assert_same_table(one: Path, two: Path) -> None:
    rows_one, rows_two = one.read_text().splitlines(), two.read_text().splitlines()
    assert rows_one[0] == rows_two[0] and len(rows_one) == len(rows_two)
    for row_one, row_two in zip(rows_one[1:], rows_two[1:], strict=True):
        for a, b in zip(row_one.split(","), row_two.split(","), strict=True):
            try:
                assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-6), (one.name, row_one, row_two)
            except ValueError:
                assert a == b


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """Five real digits as 8x8 PNGs (the tiny model's size)."""
    folder = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    paths = []
    for i in range(5):
        path = folder / f"digit{i}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("conditional", [False, True])
def test_sample_on_two_ranks_writes_byte_identical_outputs_and_a_conditional_run_resumes(
    tmp_path, monkeypatch, conditional
):
    run = make_run(tmp_path / "run", **({"num_classes": 10} if conditional else {}))
    # 7 images in batches of 3: uneven batches, and a last batch that one rank has nothing of.
    common = ["--n", "7", "--batch-size", "3", "--seed", "2", "--steps", "3", "--eta", "1"]
    if conditional:
        common += ["--class", "3,1,4"]

    def outputs(name):
        return ["--out", tmp_path / name / "grid.png", "--out-dir", tmp_path / name / "pngs"] + [
            "--npz",
            tmp_path / name / "s.npz",
            "--save-latents",
            tmp_path / name / "x_T.npy",
        ]

    one_process("sample", run, *common, *outputs("one"))
    two = two_ranks("sample", run, *common, *outputs("two"), module=True)
    assert two.stdout.count("7 images with") == 1  # rank 0 alone reports (and writes)
    # grid, npz, x_T.npy and its record x_T.npy.json, and 7 PNGs
    assert assert_same_files(tmp_path / "one", tmp_path / "two") == 4 + 7
    assert np.load(tmp_path / "two" / "s.npz")["arr_0"].shape == (7, 8, 8, 1)
    if not conditional:
        return  # resuming does not depend on the labels: the conditional case alone checks it
    # One process stopped after its first batch; two ranks finish the run.
    interrupt_after(monkeypatch, 1)
    assert ddim("sample", run, *common, *outputs("resumed")).exit_code == 130
    monkeypatch.undo()
    resumed = two_ranks("sample", run, *common, *outputs("resumed"), module=True)
    assert "3 of 7 images are done" in resumed.stderr
    assert assert_same_files(tmp_path / "one", tmp_path / "resumed") == 4 + 7


def test_compare_with_fid_on_two_ranks_matches_one_process_and_resumes(conditional_run, tmp_path):
    np.savez(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8))
    common = ["compare", conditional_run, "--steps", "2,3", "--eta", "0,1", "--no-dpm-solver"]
    common += ["--n", "3", "--fid", "7", "--batch-size", "3", "--reference", tmp_path / "ref.npz"]
    one_process(*common, "--out", tmp_path / "one")
    two = two_ranks(*common, "--out", tmp_path / "two")
    assert two.stdout.count("| sampler |") == 1
    # timing.json and the tables hold the seconds per image, which differ from run to run.
    timing = ("timing.json", "table.md", "table.csv", "time_vs_steps.png")
    assert assert_same_files(tmp_path / "one", tmp_path / "two", skip=timing) == 5 * 7 + 3

    def fids(name):
        with open(tmp_path / name / "table.csv") as handle:
            return [(row["sampler"], row["steps"], row["eta"], row["fid"]) for row in csv.DictReader(handle)]

    assert fids("one") == fids("two") and all(float(fid) > 0 for *_, fid in fids("one"))
    # Interrupted: the last images of a row are missing; the two ranks make exactly those again.
    row = tmp_path / "two" / "samples" / "ddim-S3-eta1"
    kept = (row / "000000.png").stat().st_mtime_ns
    for name in ("000004.png", "000005.png", "000006.png"):
        (row / name).unlink()
    two_ranks(*common, "--out", tmp_path / "two")
    assert (row / "000000.png").stat().st_mtime_ns == kept
    assert assert_same_files(tmp_path / "one", tmp_path / "two", skip=timing) == 5 * 7 + 3


def test_restore_on_two_ranks_writes_byte_identical_outputs(conditional_run, digit_files, tmp_path):
    common = ["restore", conditional_run, *digit_files, "--mask", "bottom-half", "--degrade", "--n-samples", "2"]
    common += ["--steps", "3", "--batch-size", "3", "--seed", "4", "--class", "0,1,2,3,4"]
    one_process(*common, "--out", tmp_path / "one", "--npz", tmp_path / "one" / "r.npz")
    two = two_ranks(*common, "--out", tmp_path / "two", "--npz", tmp_path / "two" / "r.npz")
    assert two.stdout.count("restored 5 image(s) x 2") == 1
    assert assert_same_files(tmp_path / "one", tmp_path / "two") == 3 + 10


@pytest.mark.parametrize(
    "how",
    [
        ["--method", "sdedit", "--seed", "3"],
        ["--method", "ddib", "--from-class", "1", "--null-text", "--guidance", "1"],
    ],
    ids=["sdedit", "ddib-null-text"],
)
def test_edit_on_two_ranks_writes_byte_identical_outputs(conditional_run, digit_files, tmp_path, how):
    common = ["edit", conditional_run, *digit_files, "--to-class", "7", *how, "--steps", "3", "--batch-size", "2"]
    one_process(*common, "--out", tmp_path / "one", "--npz", tmp_path / "one" / "e.npz")
    two = two_ranks(*common, "--out", tmp_path / "two", "--npz", tmp_path / "two" / "e.npz")
    assert two.stdout.count("edited 5 image(s)") == 1
    assert assert_same_files(tmp_path / "one", tmp_path / "two") == 3 + 5


def test_distill_on_two_ranks_keeps_every_student_and_rank_0_alone_writes(tmp_path):
    from test_commands import make_run
    from test_distill import SMALL

    from ddim_cli.checkpoint import list_checkpoints, load_checkpoint

    teacher = make_run(tmp_path / "teacher", prediction="v", num_classes=10)
    run = tmp_path / "student"
    result = two_ranks("distill", teacher, "--steps", 2, *SMALL, "--run-dir", run)
    assert "students (4 steps:" in result.stdout and result.stdout.count("distilled to step 6") == 1
    for steps in (4, 2):
        student = load_checkpoint(run / "students" / f"S{steps}.safetensors")
        assert student.config.distill.steps == steps
    assert [int(p.stem.split("-")[1]) for p in list_checkpoints(run / "checkpoints")][-1] == 6
    log = (run / "train.log").read_text()
    assert log.count("starting step 0 of 6") == 1 and "x2 [" in log  # one writer, two ranks
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    one_process("sample", run, "--n", 2, "--out", tmp_path / "grid.png")


def test_dmd_with_its_gan_term_distils_on_two_ranks(tmp_path):
    from test_commands import make_run

    from ddim_cli.checkpoint import list_checkpoints, load_checkpoint

    teacher = make_run(tmp_path / "teacher", prediction="v", num_classes=10)
    run = tmp_path / "student"
    options = ["distill.round_steps=2", "distill.gan_weight=0.01", "distill.regression_pairs=8", "train.batch_size=8"]
    result = two_ranks(
        "distill",
        teacher,
        "--method",
        "dmd",
        "--steps",
        1,
        *[a for o in options for a in ("--set", o)],
        "--run-dir",
        run,
    )
    assert result.stdout.count("distilled to step 2") == 1
    state = load_checkpoint(list_checkpoints(run / "checkpoints")[-1], training_state=True).training_state
    assert {"fake", "gan_head", "fake_optimizer"} <= state.keys()
