"""`ddim sample` and `ddim compare` on tiny checkpoints trained in the tests, and the helpers that the
other command tests share (the tiny config, `ddim` / `ok`, real digits as PNG files)."""

import csv
import json
import os
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from ddim_cli.checkpoint import save_checkpoint
from ddim_cli.cli import app
from ddim_cli.config import config_from_dict
from ddim_cli.images import load_images, to_uint8
from ddim_cli.jobs.sample import generate
from ddim_cli.models import SamplerSpec, load_model, noise_model
from ddim_cli.seeding import seeded_noise
from ddim_cli.train import train

TINY = {
    "name": "tiny",
    "data": {"dataset": "digits", "image_size": 8, "channels": 1},
    "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "diffusion": {"num_timesteps": 50},
    "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "sample_every": 0, "log_every": 1},
    "sample": {"steps": 5, "n": 4, "skip": "uniform"},
}


def make_run(path, **model):
    raw = json.loads(json.dumps(TINY))
    raw["model"].update(model)
    train(config_from_dict(raw), path, device="cpu", progress=False)
    return path


def ddim(*args):
    result = CliRunner().invoke(app, [str(a) for a in args] + ["--no-progress"])
    return result


def ok(*args):
    result = ddim(*args)
    assert result.exit_code == 0, result.output
    return result


def npz(path):
    return np.load(path)["arr_0"]


# --- ddim sample ---------------------------------------------------------------------------------
def test_sample_writes_grid_pngs_and_npz(run_dir, tmp_path):
    result = ok(
        "sample",
        run_dir,
        "--n",
        4,
        "--out",
        tmp_path / "grid.png",
        "--out-dir",
        tmp_path / "pngs",
        "--npz",
        tmp_path / "s.npz",
    )
    assert "4 images with ddim S=5 eta=0" in result.output and "s/image" in result.output
    assert "student" not in result.output  # only a distilled model's line names its method
    assert Image.open(tmp_path / "grid.png").size == (22, 22)  # 2 x 2 images of 8 px with 2 px padding
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    arr = npz(tmp_path / "s.npz")
    assert arr.shape == (4, 8, 8, 1) and arr.dtype == np.uint8
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / "000002.png")), arr[2, :, :, 0])


def test_default_grid_goes_to_the_run_directory(run_dir):
    result = ok("sample", run_dir, "--steps", 3, "--n", 2, "--seed", 7)
    assert (run_dir / "samples" / "sample-ddim-S3-eta0-seed7.png").is_file()
    assert str(run_dir / "samples" / "sample-ddim-S3-eta0-seed7.png") in result.output


def test_an_image_does_not_depend_on_batch_size_or_count(run_dir, tmp_path):
    ok(
        "sample",
        run_dir,
        "--eta",
        1,
        "--n",
        3,
        "--batch-size",
        3,
        "--npz",
        tmp_path / "a.npz",
        "--out",
        tmp_path / "a.png",
    )
    ok(
        "sample",
        run_dir,
        "--eta",
        1,
        "--n",
        3,
        "--batch-size",
        1,
        "--npz",
        tmp_path / "b.npz",
        "--out",
        tmp_path / "b.png",
    )
    ok("sample", run_dir, "--eta", 1, "--n", 2, "--seed", 1, "--npz", tmp_path / "c.npz", "--out", tmp_path / "c.png")
    a, b, c = npz(tmp_path / "a.npz"), npz(tmp_path / "b.npz"), npz(tmp_path / "c.npz")
    assert np.array_equal(a, b) and np.array_equal(a[1:], c)
    assert not np.array_equal(a[0], a[1])


def test_dpm_solver_sampler_uses_logsnr_spacing(run_dir, tmp_path):
    result = ok("sample", run_dir, "--sampler", "dpm++2m", "--steps", 4, "--n", 2, "--out", tmp_path / "d.png")
    assert "dpm++2m S=4" in result.output
    bad = ddim("sample", run_dir, "--sampler", "dpm++2m", "--eta", 0.5)
    assert bad.exit_code == 2 and "--eta applies to --sampler ddim only" in bad.output


def test_compiled_model_gives_the_same_images(run_dir, tmp_path, monkeypatch):
    import torch._inductor.config

    ok("sample", run_dir, "--n", 2, "--no-compile", "--npz", tmp_path / "e.npz", "--out", tmp_path / "e.png")
    # A build of its own (a warm cache of the user's would skip what this checks) of scalar C++
    # kernels: --compile must run the same function, and scalar kernels build in about 20 s, not 30-40.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        ok("sample", run_dir, "--n", 2, "--compile", "--npz", tmp_path / "c.npz", "--out", tmp_path / "c.png")
    assert any((tmp_path / "inductor").iterdir())
    assert np.abs(npz(tmp_path / "e.npz").astype(int) - npz(tmp_path / "c.npz").astype(int)).max() <= 1


def _broken_compile(monkeypatch):
    """torch.compile as it fails on a machine without Triton or a C compiler."""
    from torch._dynamo.exc import BackendCompilerFailed

    def compile(model, **kwargs):
        def compiled(*args, **kw):
            raise BackendCompilerFailed(lambda: None, RuntimeError("no working C compiler found"), None)

        return compiled

    monkeypatch.setattr(torch, "compile", compile)


def test_a_failing_compile_is_one_line_naming_the_way_out(run_dir, tmp_path, monkeypatch):
    _broken_compile(monkeypatch)
    result = ddim("sample", run_dir, "--n", 1, "--compile", "--out", tmp_path / "c.png")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: torch.compile failed (RuntimeError: no working C compiler found); run again with --no-compile"
    ]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    result = ddim("train", config, "--run-dir", tmp_path / "run", "--set", "train.compile=true")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: torch.compile failed (RuntimeError: no working C compiler found); "
        "run again with --set train.compile=false --overwrite"
    ]
    assert not list((tmp_path / "run").glob("checkpoints/*"))
    monkeypatch.undo()  # a working torch.compile; the suggested command then trains
    ok("train", config, "--run-dir", tmp_path / "run", "--set", "train.compile=false", "--overwrite")


def test_ddpm_sampler_defaults_to_every_training_step(run_dir, tmp_path):
    result = ok("sample", run_dir, "--sampler", "ddpm", "--variance", "beta", "--n", 1, "--out", tmp_path / "d.png")
    assert "ddpm S=50 var=beta" in result.output


def test_latents_round_trip_through_files(run_dir, tmp_path):
    ok(
        "sample",
        run_dir,
        "--n",
        3,
        "--save-latents",
        tmp_path / "z.npy",
        "--npz",
        tmp_path / "a.npz",
        "--out",
        tmp_path / "a.png",
    )
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (3, 1, 8, 8) and z.dtype == np.float32
    ok("sample", run_dir, "--latents", tmp_path / "z.npy", "--npz", tmp_path / "b.npz", "--out", tmp_path / "b.png")
    assert np.array_equal(npz(tmp_path / "a.npz"), npz(tmp_path / "b.npz"))
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 8, 8), np.float32))
    bad = ddim("sample", run_dir, "--latents", tmp_path / "bad.npy")
    assert bad.exit_code == 1 and "(N, 1, 8, 8)" in bad.output
    # Not .npy files: numpy would try them as pickles ("if you trust the file ... allow_pickle"),
    # and an .npz once came out as an internal error.
    np.savez(tmp_path / "z.npz", z)
    (tmp_path / "text.npy").write_text("not an array")
    for wrong in ("z.npz", "text.npy"):
        bad = ddim("sample", run_dir, "--latents", tmp_path / wrong)
        assert bad.exit_code == 1 and "are not a .npy array" in bad.output and "internal error" not in bad.output


def test_class_and_guidance(conditional_run, run_dir, tmp_path):
    ok("sample", conditional_run, "--class", 3, "--guidance", 2, "--n", 2, "--out", tmp_path / "g.png")
    for args, code, message in [
        ((conditional_run, "--class", 10), 1, "--class 10 is out of range; this model has classes 0..9"),
        ((conditional_run, "--unconditional", "--guidance", 1), 1, "--unconditional samples with the null label"),
        ((conditional_run, "--unconditional", "--class", 2), 1, "exclude each other"),
        ((conditional_run, "--class", "3,x"), 2, "--class takes comma-separated numbers"),
        # inf once wrote black images (NaN) and said nothing
        ((conditional_run, "--guidance", "inf"), 2, "guidance scale must be a finite number >= 0, got inf"),
        ((run_dir, "--class", 1), 1, "needs a class-conditional model"),
        ((run_dir, "--class", 1, "--guidance", 1), 1, "needs a class-conditional model"),
        ((run_dir, "--guidance", 1), 1, "this model is unconditional"),
    ]:
        result = ddim("sample", *args, "--n", 1, "--out", tmp_path / "x.png")
        assert result.exit_code == code and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    raw = json.loads(json.dumps(TINY))
    raw["model"]["num_classes"] = 10
    raw["sample"]["guidance"] = 1.5
    raw["sample"]["guidance_rescale"] = 0.5
    path = tmp_path_factory.mktemp("runs") / "guided"
    train(config_from_dict(raw), path, device="cpu", progress=False)
    return path


def test_default_sampling_draws_each_images_class_from_its_seed_with_the_configs_guidance(guided_run, tmp_path):
    from ddim_cli.seeding import draw_classes

    n, seed = 12, 7
    _, generators = seeded_noise((1, 8, 8), list(range(seed, seed + n)))
    drawn = draw_classes(generators, 10).tolist()  # the second draw of each image's own generator
    assert len(set(drawn)) > 3
    default = ok("sample", guided_run, "--n", n, "--seed", seed, "--batch-size", 5, "--npz", tmp_path / "d.npz")
    assert "guidance 1.5, rescale 0.5)" in default.output
    explicit = ("--class", ",".join(map(str, drawn)), "--guidance", 1.5, "--seed", seed)
    ok("sample", guided_run, "--n", n, *explicit, "--npz", tmp_path / "e.npz")
    assert np.array_equal(npz(tmp_path / "d.npz"), npz(tmp_path / "e.npz"))  # independent of the batch, too
    ok("sample", guided_run, "--n", n, "--seed", seed, "--guidance", 0, "--npz", tmp_path / "w0.npz")
    assert not np.array_equal(npz(tmp_path / "d.npz"), npz(tmp_path / "w0.npz"))
    # The config's guidance rescale applies unless --guidance-rescale says otherwise.
    plain = ok("sample", guided_run, "--n", n, "--seed", seed, "--guidance-rescale", 0, "--npz", tmp_path / "r0.npz")
    assert "guidance 1.5)" in plain.output
    assert not np.array_equal(npz(tmp_path / "d.npz"), npz(tmp_path / "r0.npz"))
    loaded = load_model(guided_run / "checkpoints" / "step-0000002.safetensors")
    x_T, generators = seeded_noise(loaded.image_shape, list(range(seed, seed + n)))
    labels = torch.tensor(drawn)
    for phi, name in ((0.5, "d.npz"), (0.0, "r0.npz")):
        make_eps = noise_model(loaded, guidance=1.5, guidance_rescale=phi)
        expected, _ = generate(
            loaded, make_eps, SamplerSpec("ddim", 5, 0.0), x_T, generators, labels=labels, batch_size=n
        )
        assert np.array_equal(to_uint8(expected), npz(tmp_path / name))
    # The first image's class and noise come from its own seed: it is the same alone.
    ok("sample", guided_run, "--n", 1, "--seed", seed, "--npz", tmp_path / "one.npz")
    assert np.array_equal(npz(tmp_path / "one.npz")[0], npz(tmp_path / "d.npz")[0])


def test_class_lists_cycle_and_unconditional_uses_the_null_label(guided_run, tmp_path):
    ok("sample", guided_run, "--n", 4, "--class", "3,7", "--npz", tmp_path / "cycle.npz")
    ok("sample", guided_run, "--n", 4, "--class", 3, "--npz", tmp_path / "three.npz")
    ok("sample", guided_run, "--n", 4, "--class", 7, "--npz", tmp_path / "seven.npz")
    cycle, three, seven = npz(tmp_path / "cycle.npz"), npz(tmp_path / "three.npz"), npz(tmp_path / "seven.npz")
    assert np.array_equal(cycle[0::2], three[0::2]) and np.array_equal(cycle[1::2], seven[1::2])
    result = ok("sample", guided_run, "--n", 3, "--unconditional", "--npz", tmp_path / "null.npz")
    assert "(null label)" in result.output
    loaded = load_model(guided_run / "checkpoints" / "step-0000002.safetensors")
    x_T, generators = seeded_noise(loaded.image_shape, [0, 1, 2])
    spec = SamplerSpec("ddim", 5, 0.0)
    expected, _ = generate(loaded, noise_model(loaded), spec, x_T, generators, labels=None, batch_size=3)
    assert np.array_equal(npz(tmp_path / "null.npz"), to_uint8(expected))


def test_training_grids_and_compare_follow_the_default_rule(guided_run, tmp_path):
    from ddim_cli.compare import run_comparison
    from ddim_cli.monitor import sample_ema

    ok("sample", guided_run, "--n", 5, "--seed", 2, "--npz", tmp_path / "d.npz")
    loaded = load_model(guided_run / "checkpoints" / "step-0000002.safetensors")
    grid_images = sample_ema(loaded.model, loaded.config, loaded.alpha_bars, [2, 3, 4, 5, 6], torch.device("cpu"))
    assert np.array_equal(to_uint8(grid_images), npz(tmp_path / "d.npz"))
    make_eps = noise_model(
        loaded, guidance=loaded.config.sample.guidance, guidance_rescale=loaded.config.sample.guidance_rescale
    )
    rows = run_comparison(loaded, make_eps, [SamplerSpec("ddim", 5, 0.0)], n=5, seed=2, batch_size=2)
    assert np.array_equal(to_uint8(rows[0].images), npz(tmp_path / "d.npz"))
    compared = ok("compare", guided_run, "--steps", 5, "--eta", 0, "--n", 5, "--seed", 2, "--out", tmp_path / "c")
    assert "wrote" in compared.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--steps", 51), 2, "from 1 to 50"),
        (("--eta", -0.5), 2, "eta must be a finite number >= 0"),
        (("--eta", "inf"), 2, "eta must be a finite number >= 0, got inf"),  # sigma = inf: NaN images
        (("--skip", "fast"), 2, "unknown spacing"),
        (("--sampler", "ddpm", "--eta", 1), 2, "--eta applies to --sampler ddim only"),
        (("--n", 0), 2, ""),
    ],
)
def test_bad_sampling_options_exit_non_zero_without_traceback(run_dir, args, code, message):
    result = ddim("sample", run_dir, *args)
    assert result.exit_code == code and message in result.output and "Traceback" not in result.output


def test_checkpoint_problems_are_clear_errors(run_dir, tmp_path):
    assert "does not exist" in ddim("sample", tmp_path / "missing.safetensors").output
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    assert "not a ddim-cli checkpoint" in ddim("sample", tmp_path / "junk.safetensors").output
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    assert "not a ddim-cli checkpoint" in ddim("sample", tmp_path / "bare.safetensors").output
    (tmp_path / "empty").mkdir()
    assert "no checkpoints in" in ddim("sample", tmp_path / "empty").output

    loaded = load_model(run_dir / "checkpoints" / "step-0000002.safetensors")
    wider = config_from_dict({**loaded.config.to_dict(), "model": {**loaded.config.to_dict()["model"], "ch": 64}})
    weights = loaded.model.state_dict()
    path = save_checkpoint(tmp_path / "ck", 1, wider, weights, weights, {})
    result = ddim("sample", path)
    assert result.exit_code == 1 and "do not fit its config: wrong shape" in result.output


def test_no_checkpoint_uses_the_newest_run_or_says_how_to_get_one(run_dir, conditional_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ddim("sample", "--n", 1)
    assert result.exit_code == 1 and "no trained run under runs/" in result.output and "ddim train" in result.output
    (tmp_path / "runs").mkdir()
    os.symlink(run_dir, tmp_path / "runs" / "old")
    os.symlink(conditional_run, tmp_path / "runs" / "new")
    now = time.time()
    os.utime(run_dir / "checkpoints" / "step-0000002.safetensors", (now - 100, now - 100))
    os.utime(conditional_run / "checkpoints" / "step-0000002.safetensors", (now, now))
    result = ok("sample", "--n", 1, "--out", tmp_path / "x.png")
    assert "using the most recently updated run: runs/new" in result.output


# --- real digits as PNG files (the invert and edit tests' inputs) -------------------------------
def digit_pngs(tmp_path, count=2):
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in range(count):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


# --- ddim compare --------------------------------------------------------------------------------
def test_compare_writes_labelled_grid_table_and_plot(run_dir, tmp_path):
    result = ok("compare", run_dir, "--steps", "2,5", "--eta", "0,1", "--n", 3, "--out", tmp_path / "cmp")
    assert "| ddim | 5 | 1 |" in result.output
    with open(tmp_path / "cmp" / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["sampler"], r["steps"], r["eta"]) for r in rows] == [
        ("ddim", "2", "0"),
        ("ddim", "5", "0"),
        ("ddim", "2", "1"),
        ("ddim", "5", "1"),
        ("dpm++2m", "2", ""),
        ("dpm++2m", "5", ""),
        ("ddpm (beta variance)", "50", ""),  # DDPM's own sampler, the paper's sigma-hat
    ]
    assert all(float(r["seconds_per_image"]) > 0 for r in rows)
    assert len((tmp_path / "cmp" / "table.md").read_text().splitlines()) == 2 + 7
    width, height = Image.open(tmp_path / "cmp" / "grid.png").size
    assert height == 7 * (64 + 4)  # seven rows of 8 px images enlarged 8x, with padding
    assert Image.open(tmp_path / "cmp" / "time_vs_steps.png").size[0] > 100
    no_ref = ok(
        "compare", run_dir, "--steps", "2", "--eta", "0", "--n", 1, "--no-ddpm-reference", "--out", tmp_path / "c2"
    )
    assert "ddpm" not in no_ref.output


def test_every_compare_row_starts_from_the_same_noise(run_dir):
    from ddim_cli.compare import run_comparison

    loaded = load_model(run_dir / "checkpoints" / "step-0000002.safetensors")
    make_eps = noise_model(loaded)
    spec = SamplerSpec("ddim", 5, 1.0)
    rows = run_comparison(loaded, make_eps, [spec, SamplerSpec("ddim", 5, 0.0), spec], n=3, seed=4, batch_size=2)
    assert torch.equal(rows[0].images, rows[2].images)  # the same x_T and the same noise stream
    x_T, generators = seeded_noise(loaded.image_shape, [4, 5, 6])
    alone, _ = generate(loaded, make_eps, SamplerSpec("ddim", 5, 0.0), x_T, generators, batch_size=2)
    assert torch.equal(rows[1].images, alone)


def test_compare_rejects_bad_lists(run_dir):
    assert ddim("compare", run_dir, "--steps", "10,x").exit_code == 2
    result = ddim("compare", run_dir, "--steps", "100")
    assert result.exit_code == 2 and "from 1 to 50" in result.output


def test_compare_sample_folders_cycle_classes_by_image_index_across_batches(guided_run, tmp_path):
    from ddim_cli.compare import fill_sample_folder
    from ddim_cli.seeding import cycle_classes

    loaded = load_model(guided_run / "checkpoints" / "step-0000002.safetensors")
    make_eps = noise_model(loaded, guidance=1.5)
    spec = SamplerSpec("ddim", 5, 0.0)
    fill_sample_folder(loaded, make_eps, spec, tmp_path / "rows", 5, 10, 2, classes=[3, 7, 1])
    written = load_images(sorted((tmp_path / "rows").glob("*.png")), 8, 1)[0]
    x_T, generators = seeded_noise(loaded.image_shape, list(range(10, 15)))
    labels = cycle_classes([3, 7, 1], 5)
    expected, _ = generate(loaded, make_eps, spec, x_T, generators, labels=labels, batch_size=5)
    # Batches of 2 and of 5 round differently in float32; a wrong class would differ by far more.
    assert np.abs(to_uint8(written).astype(int) - to_uint8(expected).astype(int)).max() <= 2
    wrong, _ = generate(loaded, make_eps, spec, x_T, generators, labels=cycle_classes([7, 1, 3], 5), batch_size=5)
    assert np.abs(to_uint8(written).astype(int) - to_uint8(wrong).astype(int)).max() > 20


@pytest.mark.parametrize("eta", ["0", "1"])
def test_saved_latents_give_back_the_same_images_with_no_other_options(conditional_run, tmp_path, eta):
    common = ("--steps", 3, "--eta", eta, "--out", tmp_path / "g.png")
    first = ok(
        "sample",
        conditional_run,
        "--n",
        6,
        "--seed",
        14,
        "--save-latents",
        tmp_path / "z.npy",
        *common,
        "--npz",
        tmp_path / "a.npz",
    )
    assert (tmp_path / "z.npy.json").is_file()
    again = ok("sample", conditional_run, "--latents", tmp_path / "z.npy", *common, "--npz", tmp_path / "b.npz")
    assert f"seed 14 from {tmp_path / 'z.npy.json'}" in again.output
    assert np.array_equal(npz(tmp_path / "a.npz"), npz(tmp_path / "b.npz"))  # classes and eta's noise too
    assert first.output.splitlines()[-2].split(" from ")[0] == again.output.splitlines()[-2].split(" from ")[0]
    # --seed says otherwise: other classes (and noise) from the same x_T.
    other = ok(
        "sample", conditional_run, "--latents", tmp_path / "z.npy", "--seed", 0, *common, "--npz", tmp_path / "c.npz"
    )
    assert "from " + str(tmp_path / "z.npy.json") not in other.output
    assert not np.array_equal(npz(tmp_path / "a.npz"), npz(tmp_path / "c.npz"))


def test_saved_latents_keep_their_classes_and_invert_latents_have_no_record(conditional_run, tmp_path):
    ok(
        "sample",
        conditional_run,
        "--n",
        4,
        "--steps",
        3,
        "--class",
        "3,7",
        "--save-latents",
        tmp_path / "z.npy",
        "--out",
        tmp_path / "g.png",
    )
    again = ok("sample", conditional_run, "--latents", tmp_path / "z.npy", "--steps", 3, "--out", tmp_path / "h.png")
    assert "--class 3,7 from" in again.output and "classes 3: 2, 7: 2" in again.output
    ok("invert", conditional_run, *digit_pngs(tmp_path), "--steps", 3, "--out", tmp_path)  # latents.npy, no record
    assert (tmp_path / "latents.npy").is_file() and not (tmp_path / "latents.npy.json").exists()
    plain = ok(
        "sample", conditional_run, "--latents", tmp_path / "latents.npy", "--steps", 3, "--out", tmp_path / "i.png"
    )
    assert "note:" not in plain.output
