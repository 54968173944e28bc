"""`ddim restore` on tiny checkpoints trained in the tests, and the library call behind it."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_commands import TINY, ddim, ok  # the same tiny runs and CLI helpers

from ddim_cli.config import config_from_dict
from ddim_cli.images import load_images
from ddim_cli.jobs.restore import degrade_images, restore_images
from ddim_cli.models import SamplerSpec, load_model, noise_model, resolve_checkpoint
from ddim_cli.restoration import Colorization, Composed, Inpainting, SuperResolution, mask_preset
from ddim_cli.train import train


def make_run(path, channels=1, **model):
    raw = json.loads(json.dumps(TINY))
    raw["model"].update(model)
    raw["data"]["channels"] = channels
    train(config_from_dict(raw), path, device="cpu", progress=False)
    return path


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "gray", num_classes=10)


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "rgb", channels=3)


def digit_pngs(directory, count=3, size=8, mode="L"):
    from sklearn.datasets import load_digits

    paths = []
    for i, image in enumerate(load_digits().images[:count]):
        pixels = (image * 16).clip(0, 255).astype(np.uint8)
        picture = Image.fromarray(pixels).resize((size, size), Image.BOX).convert(mode)
        if mode == "RGB":  # tint, so that colour matters
            picture = Image.merge("RGB", [picture.point(lambda v, k=k: v * (k + 1) // 3) for k in range(3)])
        path = directory / f"digit{i}.png"
        picture.save(path)
        paths.append(path)
    return paths


def rows_of(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def pngs(directory):
    return [np.asarray(Image.open(p)) for p in sorted(directory.iterdir())]


def test_inpainting_keeps_the_known_pixels_and_writes_every_output(gray_run, tmp_path):
    images = digit_pngs(tmp_path)
    out = tmp_path / "out"
    result = ok(
        "restore", gray_run, *images, "--mask", "bottom-half", "--degrade", "--out", out, "--npz", tmp_path / "r.npz"
    )
    assert "restored 3 image(s) x 1 with ddnm, ddim S=5 eta=1" in result.output and "PSNR" in result.output
    assert Image.open(out / "grid.png").size == (3 * 10 + 2, 3 * 10 + 2)  # original, degraded, restored
    restored = pngs(out / "restored")
    originals = [np.asarray(Image.open(p)) for p in images]
    assert len(restored) == 3
    for got, original in zip(restored, originals, strict=True):
        assert np.array_equal(got[:4], original[:4])  # the known top half, to the uint8 level
    arrays = np.load(tmp_path / "r.npz")["arr_0"]
    assert arrays.shape == (3, 8, 8, 1) and arrays.dtype == np.uint8
    assert np.array_equal(arrays[2, ..., 0], restored[2])
    rows = rows_of(out / "metrics.csv")
    assert [(r["image"], r["sample"]) for r in rows] == [(str(p), "0") for p in images]
    assert all(float(r["observation_rmse"]) < 1e-6 and float(r["psnr_db"]) > 0 for r in rows)


def test_mask_file_white_marks_what_to_fill(gray_run, tmp_path):
    images = digit_pngs(tmp_path, 2)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 5:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inputs = [np.asarray(Image.open(p)) for p in images]
    ok(
        "restore",
        gray_run,
        *images,
        "--mask",
        tmp_path / "mask.png",
        "--method",
        "repaint",
        "--jump",
        2,
        "--resample",
        2,
        "--out",
        tmp_path / "out",
    )
    for got, given in zip(pngs(tmp_path / "out" / "restored"), inputs, strict=True):
        assert np.array_equal(got[:, :5], given[:, :5])
    # A mask the inputs' size gets their resize: 16x16 inputs, a 16x16 mask, an 8x8 model.
    (tmp_path / "big").mkdir()
    big = digit_pngs(tmp_path / "big", 2, size=16)
    Image.fromarray(mask.repeat(2, 0).repeat(2, 1)).save(tmp_path / "mask16.png")
    result = ok("restore", gray_run, *big, "--mask", tmp_path / "mask16.png", "--out", tmp_path / "out16")
    assert "observation error (RMS of A x - y) 0 at most" in result.output


def test_super_resolution_takes_low_resolution_inputs_and_pools_back(gray_run, tmp_path):
    low = digit_pngs(tmp_path, 2, size=4)
    out = tmp_path / "out"
    result = ok("restore", gray_run, *low, "--sr", 2, "--n-samples", 2, "--out", out, "--seed", 5)
    assert "restored 2 image(s) x 2" in result.output
    assert Image.open(out / "grid.png").size == (2 * 10 + 2, 3 * 10 + 2)  # degraded, then 2 rows of samples
    restored = torch.tensor(np.stack(pngs(out / "restored")), dtype=torch.float64)[:, None] / 127.5 - 1
    assert restored.shape == (4, 1, 8, 8)
    given, _ = load_images(low, 4, 1)
    # Each of the two restorations of an input pools back to it: to half a uint8 level (1/255 on
    # [-1, 1]), the rounding of the saved pixels, since the result lies in [-1, 1] and needs no clamp.
    pooled = F.avg_pool2d(restored, 2)
    assert (pooled - given.double().repeat_interleave(2, 0)).abs().max() <= 1 / 255 + 1e-6
    assert not torch.equal(restored[0], restored[1])  # the two samples differ
    assert [r["sample"] for r in rows_of(out / "metrics.csv")] == ["0", "1", "0", "1"]
    assert all(r["psnr_db"] == "" for r in rows_of(out / "metrics.csv"))  # no original to score against


def test_denoising_is_seeded_and_uses_ddnm_plus(gray_run, tmp_path):
    images = digit_pngs(tmp_path, 2)

    def restored(name, seed):
        out = ["--out", tmp_path / name, "--npz", tmp_path / f"{name}.npz", "--seed", seed]
        result = ok("restore", gray_run, *images, "--sigma", 0.2, "--degrade", *out)
        assert "with ddnm (DDNM+)" in result.output
        return np.load(tmp_path / f"{name}.npz")["arr_0"]

    first = restored("a", 3)
    assert np.array_equal(first, restored("b", 3))
    assert not np.array_equal(first, restored("c", 4))


def test_colourisation_keeps_the_luma_of_gray_inputs(rgb_run, tmp_path):
    images = digit_pngs(tmp_path, 2, mode="L")
    out = tmp_path / "out"
    ok("restore", rgb_run, *images, "--gray", "--out", out)
    restored = np.stack(pngs(out / "restored")).astype(np.float64)  # (N, 8, 8, 3)
    luma = restored @ np.array([0.299, 0.587, 0.114])
    given = np.stack([np.asarray(Image.open(p)) for p in images]).astype(np.float64)
    # Exact before clamping to [0, 255] and rounding; the clamp may cut where the colour saturates.
    assert np.median(np.abs(luma - given)) < 1.0


def test_class_conditional_restoration_with_guidance(gray_run, tmp_path):
    images = digit_pngs(tmp_path, 2)
    result = ok("restore", gray_run, *images, "--mask", "center", "--class", "3,7", "--guidance", 1, "--out", tmp_path)
    assert "class 3: 1, 7: 1 guidance 1" in result.output


def test_library_restoration_of_a_trained_model_is_consistent(gray_run, tmp_path):
    # Super-resolution and a mask on a real (tiny) U-Net, unclamped: A x = y to float32 rounding.
    loaded = load_model(resolve_checkpoint(gray_run)[0])
    clean, _ = load_images(digit_pngs(tmp_path), 8, 1)
    spec = SamplerSpec("ddim", 5, 0.5, "uniform", clip_x0=True)
    for degradation in (SuperResolution(2), Inpainting(mask_preset("random:0.5", 8, 8, torch.Generator()))):
        y = degrade_images(degradation, clean, seed=0)
        restored = restore_images(loaded, noise_model(loaded), y, degradation, spec, seed=0, batch_size=2)
        assert (degradation.degrade(restored) - y).abs().max() < 1e-5


def test_restore_clamps_x0_whatever_the_sample_config_says(tmp_path):
    # The digits quickstart samples unclamped (sample.clip_x0: false); restoration still clamps by
    # default, so that its result is the nearest image in [-1, 1] with A x = y.
    raw = json.loads(json.dumps(TINY))
    raw["sample"]["clip_x0"] = False
    run = tmp_path / "run"
    train(config_from_dict(raw), run, device="cpu", progress=False)
    images = digit_pngs(tmp_path, 2)
    for name, flags in (("default", ()), ("clamped", ("--clip-x0",)), ("unclamped", ("--no-clip-x0",))):
        ok("restore", run, *images, "--sr", 2, "--degrade", "--seed", 0, *flags, "--out", tmp_path / name)
    default, clamped, unclamped = (pngs(tmp_path / name / "restored") for name in ("default", "clamped", "unclamped"))
    assert all(np.array_equal(a, b) for a, b in zip(default, clamped, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(default, unclamped, strict=True))


def test_degrade_images_noise_is_seeded_per_image_and_apart_from_the_restoration_seeds():
    clean = torch.zeros(3, 3, 8, 8)
    A = Composed([Colorization(), SuperResolution(2)], sigma=0.5)
    y = degrade_images(A, clean, seed=0)
    assert y.shape == (3, 1, 4, 4)
    torch.testing.assert_close(degrade_images(A, clean, seed=0), y)
    assert not torch.allclose(degrade_images(A, clean, seed=1), y)
    assert not torch.allclose(y[0], y[1])
    noise = (y / 0.5).flatten(1)
    for k in range(4):  # restoration k's x_T: the first draw of seed k's generator
        x_T = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(k)).flatten()[:16]
        assert not any(torch.allclose(n, x_T) for n in noise)
    assert abs(float(noise.mean())) < 0.3 and 0.7 < float(noise.std()) < 1.3  # N(0, 1) noise scaled by sigma


@pytest.mark.parametrize(
    "fixture, args, code, message",
    [
        ("gray_run", (), 2, "give a degradation to undo"),
        ("gray_run", ("--sigma", -0.1), 2, "--sigma is a noise standard deviation"),
        ("gray_run", ("--sr", 1), 2, "--sr is the downscaling factor"),
        (
            "gray_run",
            ("--sr", 3, "--degrade"),
            1,
            "--sr 3 does not divide the model's resolution 8; use one of 2, 4, 8",
        ),
        ("gray_run", ("--sr", 2), 1, "with --sr 2 the inputs are the 4x4 low-resolution images"),
        ("gray_run", ("--gray",), 1, "--gray colourises RGB models; this model has 1 channel(s)"),
        ("gray_run", ("--mask", "center", "--sr", 2), 2, "--mask and --sr cannot be combined"),
        ("gray_run", ("--mask", "diagonal"), 1, "is neither a preset"),
        ("gray_run", ("--mask", "random:1.5"), 2, "random:P needs a fraction"),
        ("gray_run", ("--sigma", 0.1, "--method", "repaint"), 2, "--method repaint assumes noiseless inputs"),
        ("gray_run", ("--mask", "center", "--guidance", 1), 1, "--guidance needs --class K"),
        ("gray_run", ("--mask", "center", "--class", 10), 1, "--class 10 is out of range"),
        ("rgb_run", ("--mask", "center", "--class", 1), 1, "needs a class-conditional model"),
    ],
)
def test_bad_input_is_a_one_line_error(request, tmp_path, fixture, args, code, message):
    run = request.getfixturevalue(fixture)
    result = ddim("restore", run, *digit_pngs(tmp_path, 1), *args, "--out", tmp_path / "out")
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_mask_file_of_another_size_is_a_one_line_error(gray_run, tmp_path):
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "mask.png")
    result = ddim("restore", gray_run, *digit_pngs(tmp_path, 1), "--mask", tmp_path / "mask.png")
    assert result.exit_code == 1 and "is 5x5; it must be 8x8 (model or input size)" in result.output
