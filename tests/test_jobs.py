"""The library jobs write what their commands write: the same bytes from Python as from the CLI."""

import numpy as np
import torch
from test_commands import digit_pngs, ok

from ddim_cli.images import load_images
from ddim_cli.jobs.edit import edit_images, write_edits
from ddim_cli.jobs.invert import invert_to_folder
from ddim_cli.jobs.restore import degrade_images, restore_images, write_restorations
from ddim_cli.jobs.sample import sample_to_files
from ddim_cli.models import SamplerSpec, load_model, noise_model, resolve_checkpoint
from ddim_cli.restoration import SuperResolution


def loaded_run(run):
    return load_model(resolve_checkpoint(run)[0])


def test_sample_to_files_writes_what_ddim_sample_writes(conditional_run, tmp_path):
    ok(
        "sample",
        conditional_run,
        "--n",
        5,
        "--steps",
        4,
        "--class",
        "3,1",
        "--guidance",
        0.5,
        "--out",
        tmp_path / "cli.png",
        "--npz",
        tmp_path / "cli.npz",
        "--save-latents",
        tmp_path / "cli.npy",
    )
    loaded = loaded_run(conditional_run)
    spec = SamplerSpec("ddim", 4, 0.0, "uniform", clip_x0=loaded.config.sample.clip_x0)
    run = sample_to_files(
        loaded,
        spec,
        tmp_path / "lib.png",
        count=5,
        seed=loaded.config.sample.seed,
        classes=[3, 1],
        guidance=0.5,
        guidance_rescale=loaded.config.sample.guidance_rescale,
        npz=tmp_path / "lib.npz",
        save_latents=tmp_path / "lib.npy",
        precision="fp32",
    )
    assert run.labels.tolist() == [3, 1, 3, 1, 3]
    assert np.array_equal(np.load(tmp_path / "cli.npz")["arr_0"], np.load(tmp_path / "lib.npz")["arr_0"])
    assert np.array_equal(np.load(tmp_path / "cli.npy"), np.load(tmp_path / "lib.npy"))
    assert (tmp_path / "cli.png").read_bytes() == (tmp_path / "lib.png").read_bytes()


def test_invert_to_folder_writes_what_ddim_invert_writes(run_dir, tmp_path):
    paths = digit_pngs(tmp_path, 2)
    ok("invert", run_dir, *paths, "--steps", 5, "--exact", "--interpolate", 3, "--out", tmp_path / "cli")
    loaded = loaded_run(run_dir)
    originals = load_images(paths, 8, 1)[0]
    spec = SamplerSpec("ddim", 5, 0.0, "uniform", clip_x0=False)
    run = invert_to_folder(
        loaded, originals, [str(p) for p in paths], spec, tmp_path / "lib", exact=True, interpolate=3
    )
    assert run.written == ["latents.npy", "grid.png", "metrics.csv", "interpolation.png"]
    for name in run.written:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes(), name
    assert all(report.converged for report in run.report)


def test_edit_and_restore_writers_write_what_the_commands_write(conditional_run, tmp_path):
    paths = digit_pngs(tmp_path, 2)
    names = [str(p) for p in paths]
    loaded = loaded_run(conditional_run)
    originals = load_images(paths, 8, 1)[0]
    spec = SamplerSpec("ddim", 4, 0.0, "uniform", clip_x0=False)

    ok("edit", conditional_run, *paths, "--to-class", 7, "--steps", 4, "--guidance", 0.5, "--out", tmp_path / "e1")
    to_labels = torch.full((2,), 7)
    edited = edit_images(
        loaded,
        originals,
        spec,
        to_labels,
        guidance=0.5,
        guidance_rescale=loaded.config.sample.guidance_rescale,
        batch_size=64,
    )
    write_edits(tmp_path / "e2", originals, edited, names, to_labels)
    for name in ("grid.png", "distances.csv", "edited/000001.png"):
        assert (tmp_path / "e1" / name).read_bytes() == (tmp_path / "e2" / name).read_bytes(), name

    ok(
        "restore",
        conditional_run,
        *paths,
        "--sr",
        2,
        "--degrade",
        "--steps",
        4,
        "--n-samples",
        2,
        "--seed",
        3,
        "--out",
        tmp_path / "r1",
    )
    sr = SuperResolution(2)
    observations = degrade_images(sr, originals, seed=3)
    restored = restore_images(
        loaded,
        noise_model(loaded),
        observations,
        sr,
        SamplerSpec("ddim", 4, 1.0, "uniform", clip_x0=True),
        seed=3,
        samples_per_input=2,
        batch_size=64,
    )
    scores, _ = write_restorations(tmp_path / "r2", restored, observations, sr, names, originals=originals)
    assert len(scores.psnr) == 4 and len(scores.degraded_psnr) == 2
    for name in ("grid.png", "metrics.csv", "restored/000003.png"):
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes(), name
