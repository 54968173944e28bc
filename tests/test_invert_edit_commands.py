"""`ddim invert` and `ddim edit` on the tiny runs: written files, reconstructions, bad input."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from test_commands import ddim, digit_pngs, npz, ok

from ddim_cli.images import load_images
from ddim_cli.models import SamplerSpec, load_model


# --- ddim invert ---------------------------------------------------------------------------------
def test_invert_writes_latents_grid_metrics_and_reconstructs_through_sample(run_dir, tmp_path):
    images = digit_pngs(tmp_path)
    result = ok("invert", run_dir, *images, "--steps", 5, "--out", tmp_path / "inv")
    assert "note: " not in result.output  # 8x8 grayscale needs no conversion
    latents = np.load(tmp_path / "inv" / "latents.npy")
    assert latents.shape == (2, 1, 8, 8) and latents.dtype == np.float32
    assert Image.open(tmp_path / "inv" / "grid.png").size == (22, 32)  # originals, reconstructions, latents
    with open(tmp_path / "inv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [str(p) for p in images]

    # `sample --latents` from the saved latents is the reconstruction the metrics describe.
    ok(
        "sample",
        run_dir,
        "--latents",
        tmp_path / "inv" / "latents.npy",
        "--steps",
        5,
        "--no-clip-x0",
        "--npz",
        tmp_path / "r.npz",
        "--out",
        tmp_path / "r.png",
    )
    recon = torch.from_numpy(npz(tmp_path / "r.npz")).permute(0, 3, 1, 2).float() / 127.5 - 1
    originals, _ = load_images(images, 8, 1)
    mse = (recon - originals).pow(2).flatten(1).mean(1)
    for row, value in zip(rows, mse, strict=True):
        assert float(row["mse"]) == pytest.approx(float(value), abs=2e-3)  # uint8 rounding of the npz


def mean_csv_mse_of(path, column):
    with open(path) as handle:
        return float(np.mean([float(row[column]) for row in csv.DictReader(handle)]))


def mean_csv_mse(path):
    return mean_csv_mse_of(path, "mse")


def test_invert_exact_reconstructs_to_the_tolerance_and_reports_its_iterations(run_dir, tmp_path):
    images = digit_pngs(tmp_path)
    ok("invert", run_dir, *images, "--steps", 5, "--out", tmp_path / "plain")
    result = ok("invert", run_dir, *images, "--steps", 5, "--exact", "--tol", "1e-5", "--out", tmp_path / "exact")
    assert "exact inversion: " in result.output and "model calls per step" in result.output
    plain, exact = mean_csv_mse(tmp_path / "plain" / "metrics.csv"), mean_csv_mse(tmp_path / "exact" / "metrics.csv")
    assert exact < 1e-6 < plain / 100
    assert "every image reconstructs within --tol 1e-05 RMS" in result.output
    capped = ok("invert", run_dir, *images, "--steps", 5, "--exact", "--max-iter", 1, "--tol", "1e-12")
    assert f"{len(images)} of {len(images)} image(s) missed --tol 1e-12 RMS" in capped.output
    assert all(f"{image}: reconstruction RMS" in capped.output for image in images)
    bad = ddim("invert", run_dir, *images, "--exact", "--tol", 0)
    assert bad.exit_code == 2 and "--tol must be > 0" in bad.output


def test_invert_null_text_writes_embeddings_that_sample_reproduces(conditional_run, tmp_path):
    images = digit_pngs(tmp_path)
    common = ("--class", "1,2", "--guidance", 3, "--steps", 3)  # each image its own class
    result = ok(
        "invert", conditional_run, *images, *common, "--null-text", "--inner-steps", 5, "--out", tmp_path / "nt"
    )
    assert "null-text inversion at guidance 3" in result.output and "--null-embeddings" in result.output
    embeddings = tmp_path / "nt" / "null_embeddings.safetensors"
    ok(
        "sample",
        conditional_run,
        "--latents",
        tmp_path / "nt" / "latents.npy",
        "--null-embeddings",
        embeddings,
        "--steps",
        3,
        "--npz",
        tmp_path / "r.npz",
        "--out",
        tmp_path / "r.png",
    )
    # The grid's second row holds invert's reconstructions (8x8 images, 2-pixel padding).
    grid = np.asarray(Image.open(tmp_path / "nt" / "grid.png").convert("L")).astype(int)
    shown = np.stack([grid[12:20, 2 + 10 * i : 10 + 10 * i] for i in range(2)])
    assert np.abs(npz(tmp_path / "r.npz")[..., 0].astype(int) - shown).max() <= 1
    from ddim_cli.images import load_null_embeddings

    fitted, fitted_steps, labels, guidance = load_null_embeddings(embeddings)
    assert fitted.shape[:2] == (3, 2) and labels.tolist() == [1, 2] and guidance == 3.0
    assert (
        fitted_steps.tolist()
        == SamplerSpec(steps=3)
        .timesteps(load_model(conditional_run / "checkpoints" / "step-0000002.safetensors").alpha_bars)
        .tolist()
    )

    wrong_steps = ddim(
        "sample", conditional_run, "--latents", tmp_path / "nt" / "latents.npy", "--null-embeddings", embeddings
    )
    assert wrong_steps.exit_code == 1 and "pass the --steps and --skip given to invert" in wrong_steps.output
    from ddim_cli.images import save_null_embeddings

    save_null_embeddings(tmp_path / "other.safetensors", fitted[..., :5], fitted_steps, labels, 3.0)
    other_model = ddim(
        "sample",
        conditional_run,
        "--latents",
        tmp_path / "nt" / "latents.npy",
        "--null-embeddings",
        tmp_path / "other.safetensors",
        "--steps",
        3,
    )
    assert other_model.exit_code == 1 and "not fitted for this model" in other_model.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("--class", 1, "--null-text"), "--null-text needs --class K and --guidance W > 0"),
        (("--guidance", 2, "--null-text"), "--null-text needs --class K and --guidance W > 0"),
        (("--class", 1, "--guidance", 2, "--null-text", "--interpolate", 3), "drop --null-text"),
    ],
)
def test_invert_null_text_bad_options_are_one_line_errors(conditional_run, tmp_path, args, message):
    result = ddim("invert", conditional_run, *digit_pngs(tmp_path), *args)
    assert result.exit_code == 2 and message in result.output


def test_sample_null_embeddings_needs_latents_and_a_readable_file(conditional_run, tmp_path):
    result = ddim("sample", conditional_run, "--null-embeddings", tmp_path / "e.safetensors")
    assert result.exit_code == 2 and "--null-embeddings needs --latents" in result.output
    np.save(tmp_path / "z.npy", np.zeros((2, 1, 8, 8), np.float32))
    (tmp_path / "e.safetensors").write_text("not a safetensors file")
    result = ddim(
        "sample", conditional_run, "--latents", tmp_path / "z.npy", "--null-embeddings", tmp_path / "e.safetensors"
    )
    assert result.exit_code == 1 and "cannot read null embeddings" in result.output


# --- ddim edit -----------------------------------------------------------------------------------
def test_edit_writes_grid_pngs_csv_and_npz_in_input_order(conditional_run, tmp_path):
    images = digit_pngs(tmp_path, 3)
    out = tmp_path / "edit"
    result = ok(
        "edit", conditional_run, *images, "--to-class", 7, "--steps", 3, "--out", out, "--npz", tmp_path / "e.npz"
    )
    assert "edited 3 image(s) to class 7 with ddib + exact inversion" in result.output
    assert Image.open(out / "grid.png").size == (3 * 10 + 2, 2 * 10 + 2)  # originals above edits
    assert sorted(p.name for p in (out / "edited").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    with open(out / "distances.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["image"], r["from_class"], r["to_class"]) for r in rows] == [(str(p), "null", "7") for p in images]
    edits = npz(tmp_path / "e.npz")
    assert edits.shape == (3, 8, 8, 1) and edits.dtype == np.uint8
    assert np.array_equal(edits[1, ..., 0], np.asarray(Image.open(out / "edited" / "000001.png")))
    originals, _ = load_images(images, 8, 1)
    mse = (torch.from_numpy(edits).permute(0, 3, 1, 2).float() / 127.5 - 1 - originals).pow(2).flatten(1).mean(1)
    for row, value in zip(rows, mse, strict=True):
        assert float(row["mse_to_source"]) == pytest.approx(float(value), abs=2e-3)


def test_edit_to_its_own_class_gives_the_image_back(conditional_run, tmp_path):
    images = digit_pngs(tmp_path)
    args = ("--from-class", 2, "--to-class", 2, "--guidance", 0, "--steps", 4, "--out", tmp_path / "same")
    ok("edit", conditional_run, *images, *args)
    assert mean_csv_mse_of(tmp_path / "same" / "distances.csv", "mse_to_source") < 1e-4


def test_edit_sdedit_is_seeded_and_strength_sets_the_distance(conditional_run, tmp_path):
    images = digit_pngs(tmp_path)
    mse = {}
    for strength in ("0.1", "1"):
        for run in ("a", "b"):
            out = tmp_path / f"{strength}{run}"
            ok(
                "edit",
                conditional_run,
                *images,
                "--to-class",
                5,
                "--method",
                "sdedit",
                "--strength",
                strength,
                "--out",
                out,
            )
            mse[strength + run] = mean_csv_mse_of(out / "distances.csv", "mse_to_source")
    assert mse["0.1a"] == mse["0.1b"] and mse["1a"] == mse["1b"]
    assert mse["0.1a"] < mse["1a"]


@pytest.mark.parametrize(
    "fixture, args, code, message",
    [
        ("run_dir", ("--to-class", 1), 1, "needs a class-conditional model"),
        ("conditional_run", ("--to-class", 10), 1, "--to-class 10 is out of range"),
        ("conditional_run", ("--to-class", 1, "--from-class", -1), 1, "--from-class -1 is out of range"),
        (
            "conditional_run",
            ("--to-class", 1, "--from-class", 2, "--null-text", "--guidance", 0),
            2,
            "--null-text needs",
        ),
        ("conditional_run", ("--to-class", 1, "--null-text", "--guidance", 2), 2, "--from-class J"),
        (
            "conditional_run",
            ("--to-class", 1, "--method", "sdedit", "--strength", 0),
            2,
            "--strength must lie in (0, 1]",
        ),
        ("conditional_run", ("--to-class", 1, "--method", "sdedit", "--strength", 1.5), 2, "(0, 1]"),
        # the other method's options were once ignored without a word
        ("conditional_run", ("--to-class", 1, "--method", "sdedit", "--exact"), 2, "--exact/--no-exact applies to"),
        (
            "conditional_run",
            ("--to-class", 1, "--method", "sdedit", "--from-class", 2, "--no-exact"),
            2,
            "--exact/--no-exact and --from-class apply to --method ddib only",
        ),
        ("conditional_run", ("--to-class", 1, "--strength", 0.5), 2, "--strength applies to --method sdedit only"),
        ("conditional_run", ("--to-class", 1, "--seed", 3), 2, "--seed applies to --method sdedit only"),
    ],
)
def test_edit_bad_input_is_a_one_line_error(request, tmp_path, fixture, args, code, message):
    run = request.getfixturevalue(fixture)
    result = ddim("edit", run, *digit_pngs(tmp_path, 1), *args, "--out", tmp_path / "edit")
    assert result.exit_code == code and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "edit").exists()


# --- ddim invert: an exact noise model, interpolation, any image size, missing files -------------
def test_invert_then_sample_reconstructs_with_an_exact_noise_model(tmp_path):
    """With the Gaussian oracle instead of a trained net, inversion is tight (library-level check)."""
    from oracles import gaussian_eps_model

    from ddim_cli.sampling import invert, sample
    from ddim_cli.schedule import alpha_bars, timesteps

    ab, ts = alpha_bars("linear", 1000), timesteps(1000, 250)
    eps_model = gaussian_eps_model(0.0, 0.5, ab)
    x0 = 0.5 * torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    recon = sample(eps_model, invert(eps_model, x0, ab, ts), ab, ts)
    assert (recon - x0).pow(2).mean() < 1e-4


def test_invert_interpolates_between_two_images(run_dir, tmp_path):
    images = digit_pngs(tmp_path)
    ok("invert", run_dir, *images, "--steps", 5, "--interpolate", 5, "--out", tmp_path / "inv")
    assert Image.open(tmp_path / "inv" / "interpolation.png").size == (5 * 10 + 2, 12)
    wrong = ddim("invert", run_dir, images[0], "--interpolate", 5)
    assert wrong.exit_code == 2 and "exactly two images" in wrong.output


def test_invert_resizes_any_image_with_a_note(run_dir, tmp_path):
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "wide.png")
    result = ok("invert", run_dir, tmp_path / "wide.png", "--steps", 2, "--out", tmp_path / "inv")
    assert "note: " in result.output and "RGB 30x20 -> L 8x8" in result.output


def test_invert_missing_or_unreadable_image_writes_nothing(run_dir, tmp_path):
    good = digit_pngs(tmp_path, 1)[0]
    result = ddim("invert", run_dir, good, tmp_path / "missing.png", "--out", tmp_path / "inv")
    assert result.exit_code == 1 and "missing.png does not exist" in result.output
    (tmp_path / "text.png").write_text("hello")
    result = ddim("invert", run_dir, good, tmp_path / "text.png", "--out", tmp_path / "inv")
    assert result.exit_code == 1 and "cannot read image" in result.output and "text.png" in result.output
    assert not (tmp_path / "inv").exists()
