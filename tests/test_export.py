"""`ddim export --format diffusers`: diffusers loads the export and computes what we compute."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, LCMScheduler, UNet2DModel
from safetensors.torch import load_file
from test_commands import make_run, ok
from test_convert import DDPM_FAMILY, random_diffusers_unet
from typer.testing import CliRunner

from ddim_cli.cli import app
from ddim_cli.config import config_from_dict
from ddim_cli.distillation import consistency_times
from ddim_cli.export import scheduler_config
from ddim_cli.images import save_latents
from ddim_cli.models import load_model, resolve_checkpoint


def cli(*args):
    """The command without test_commands' --no-progress (export and convert have no progress bar)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def cli_ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def ddim_sample_of(run, latents, tmp_path, *options):
    """``ddim sample RUN --latents ... OPTIONS`` as uint8 images (its .npz)."""
    save_latents(latents, tmp_path / "z.npy")
    ok(
        "sample",
        run,
        "--latents",
        tmp_path / "z.npy",
        *options,
        "--npz",
        tmp_path / "s.npz",
        "--out",
        tmp_path / "g.png",
    )
    return np.load(tmp_path / "s.npz")["arr_0"]


def test_diffusers_reproduces_ddim_sample_from_the_same_latents(run_dir, tmp_path):
    logged = []  # the read-back check is quiet: diffusers logs a paragraph for low_cpu_mem_usage without
    handler = logging.Handler()  # accelerate installed (the test environment has none)
    handler.emit = logged.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        result = cli_ok("export", run_dir, "--out", tmp_path / "pipe")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert "DDIMPipeline.from_pretrained" in result.output
    assert not [record.getMessage() for record in logged if "accelerate" in record.getMessage()]
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = ddim_sample_of(run_dir, latents, tmp_path, "--steps", 5, "--eta", 0)

    pipe = DDIMPipeline.from_pretrained(tmp_path / "pipe")
    scheduler = pipe.scheduler
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == [40, 30, 20, 10, 0]  # our uniform spacing, T = 50
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert np.abs(to_uint8(x).astype(int) - ours.astype(int)).max() <= 1  # within one uint8 level
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images  # the pipeline runs as is
    assert images.shape == (1, 8, 8, 1)


def test_a_class_conditional_export_gives_the_same_eps_for_every_label(conditional_run, tmp_path):
    cli_ok("export", conditional_run, "--out", tmp_path / "pipe")
    config = json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())
    assert config["num_class_embeds"] == 11  # ten classes and the null label
    theirs = UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    loaded = load_model(resolve_checkpoint(conditional_run)[0])
    x = torch.randn(11, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.arange(11) * 4
    labels = torch.arange(11)  # 10 is the null label
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(x, t, labels), theirs(x, t, class_labels=labels).sample, rtol=0, atol=1e-5
        )
    # And back: convert reads num_class_embeds as num_classes + the null label, weights unchanged.
    cli_ok("convert", tmp_path / "pipe", "--out", tmp_path / "back.safetensors")
    back = load_model(tmp_path / "back.safetensors")
    assert back.config.model.num_classes == 10 and back.prediction == loaded.prediction
    ours = loaded.model.state_dict()
    assert all(torch.equal(value, ours[key]) for key, value in back.model.state_dict().items())


def test_convert_then_export_gives_back_the_diffusers_weights_and_config(tmp_path):
    theirs = random_diffusers_unet()
    theirs.save_pretrained(tmp_path / "original" / "unet")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True).save_pretrained(
        tmp_path / "original" / "scheduler"
    )
    cli_ok("convert", tmp_path / "original", "--out", tmp_path / "ours.safetensors")
    cli_ok("export", tmp_path / "ours.safetensors", "--out", tmp_path / "again")
    before = load_file(tmp_path / "original" / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    exported = json.loads((tmp_path / "again" / "unet" / "config.json").read_text())
    for key, value in DDPM_FAMILY.items():
        assert exported[key] == (list(value) if isinstance(value, tuple) else value), key
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "again" / "scheduler")
    torch.testing.assert_close(scheduler.alphas_cumprod, DDIMScheduler(beta_schedule="linear").alphas_cumprod)


def test_schedules_diffusers_cannot_name_are_exported_as_betas():
    raw = {"data": {"image_size": 8}, "model": {"ch": 32, "ch_mult": [1]}, "diffusion": {"schedule": "sigmoid"}}
    config = config_from_dict(raw)
    exported = scheduler_config(config)
    assert exported["trained_betas"] is not None
    scheduler = DDIMScheduler(**{k: v for k, v in exported.items() if not k.startswith("_")})
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), config.alpha_bars(), rtol=0, atol=1e-6)


def test_export_errors_are_one_line(run_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    result = cli("export", run_dir, "--out", tmp_path / "file")
    assert result.exit_code == 1 and "exists and is not a directory" in result.output
    result = cli("export", tmp_path / "missing.safetensors", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "does not exist" in result.output


def diffusers_steps(folder, latents, steps, labels=None, patch=1):
    """Sample the export as its README says: the scheduler stepped over the UNet2DModel, on the
    pixel-unshuffled latents for a patched model."""
    import torch.nn.functional as F

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    x = F.pixel_unshuffle(latents, patch) if patch > 1 else latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, eta=0.0).prev_sample
    return F.pixel_shuffle(x, patch) if patch > 1 else x


def test_a_patched_model_exports_and_diffusers_reproduces_it(tmp_path):
    run = make_run(tmp_path / "patched", patch_size=2, num_classes=10)
    result = cli_ok("export", run, "--out", tmp_path / "out")
    assert "README.md shows" in result.output and "checked by loading them with diffusers" in result.output
    assert not (tmp_path / "out" / "model_index.json").exists()  # DDIMPipeline would run it on the wrong shape
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "F.pixel_unshuffle" in readme and "F.pixel_shuffle(x, 2)" in readme
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = ddim_sample_of(run, latents, tmp_path, "--steps", 5, "--class", 4, "--guidance", 0)
    theirs = diffusers_steps(tmp_path / "out", latents, 5, labels=torch.full((3,), 4), patch=2)
    assert np.abs(to_uint8(theirs).astype(int) - ours.astype(int)).max() <= 1
    # ddim convert reads the export back as the model it was (diffusers' configs cannot say "patched":
    # from them alone it was "data.channels: must be 1 or 3, got 4").
    cli_ok("convert", tmp_path / "out", "--out", tmp_path / "back.safetensors")
    original, back = load_model(resolve_checkpoint(run)[0][0]), load_model(tmp_path / "back.safetensors")
    assert back.config.to_dict() == original.config.to_dict()
    assert all(torch.equal(v, original.model.state_dict()[k]) for k, v in back.model.state_dict().items())


def test_an_export_whose_unet_changed_since_is_not_converted_under_its_old_config(run_dir, tmp_path):
    cli_ok("export", run_dir, "--out", tmp_path / "out")
    unet = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    (tmp_path / "out" / "unet" / "config.json").write_text(json.dumps({**unet, "norm_num_groups": 16}))
    result = cli("convert", tmp_path / "out", "--out", tmp_path / "back.safetensors")
    assert result.exit_code == 1 and "ddim-cli.yaml describes another U-Net than" in result.output, result.output
    assert "differ in norm_num_groups" in result.output and not (tmp_path / "back.safetensors").exists()


def test_the_exported_readme_samples_as_ddim_sample_does_guidance_included(tmp_path):
    from test_commands import TINY

    from ddim_cli.train import train

    raw = json.loads(json.dumps(TINY))
    raw["model"].update(patch_size=2, num_classes=10, prediction="v")
    raw["sample"].update(guidance=0.5, guidance_rescale=0.7)
    train(config_from_dict(raw), tmp_path / "guided", device="cpu", progress=False)
    cli_ok("export", tmp_path / "guided", "--out", tmp_path / "out")
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "classifier-free guidance w = 0.5" in readme and "guidance rescale 0.7" in readme
    code = readme.split("```python\n")[1].split("```")[0]
    assert code.count("torch.randn(4, 1, 8, 8)") == 1 and "labels = torch.tensor([3] * 4)" in code
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    scope = {"latents": latents}
    exec(code.replace("THIS_FOLDER", str(tmp_path / "out")).replace("torch.randn(4, 1, 8, 8)", "latents"), scope)
    ours = ddim_sample_of(tmp_path / "guided", latents, tmp_path, "--class", 3)  # the config's guidance and rescale
    assert np.abs(to_uint8(scope["images"]).astype(int) - ours.astype(int)).max() <= 1


def test_what_diffusers_cannot_load_is_refused_and_nothing_is_written(tmp_path):
    run = make_run(tmp_path / "wide", ch_mult=[2, 2])
    result = cli("export", run, "--out", tmp_path / "out")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "its conv_in outputs block_out_channels[0] = 64 channels, ours outputs ch = 32" in result.output
    assert "a model with ch 64 and ch_mult [1, 1] has the same level widths and exports" in result.output
    assert not (tmp_path / "out").exists()


def test_a_failed_load_back_writes_nothing(run_dir, tmp_path, monkeypatch):
    import ddim_cli.export as export

    monkeypatch.setattr(export, "unet_config", lambda config: {"_class_name": "UNet2DModel", "sample_size": "x"})
    result = cli("export", run_dir, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "diffusers cannot load this export" in result.output, result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_progressive_student_exports_and_reproduces_ddim_sample(tmp_path):
    from test_distill import SMALL

    teacher = make_run(tmp_path / "teacher", prediction="v", num_classes=10)
    student = tmp_path / "student"
    ok("distill", teacher, "--steps", 2, *SMALL, "--run-dir", student)
    cli_ok("export", student, "--out", tmp_path / "out")
    assert "2-step student" in (tmp_path / "out" / "README.md").read_text()
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = ddim_sample_of(student, latents, tmp_path, "--class", 6)
    theirs = diffusers_steps(tmp_path / "out", latents, 2, labels=torch.full((3,), 6))
    assert np.abs(to_uint8(theirs).astype(int) - ours.astype(int)).max() <= 1
    # Converted back it is a student file outside any run: it samples as itself, and only in its steps
    # (a student file outside students/ once said "'.' has kept no student yet").
    cli_ok("convert", tmp_path / "out", "--out", tmp_path / "back.safetensors")
    assert np.array_equal(ddim_sample_of(tmp_path / "back.safetensors", latents, tmp_path, "--class", 6), ours)
    result = cli("sample", tmp_path / "back.safetensors", "--steps", 4)
    assert result.exit_code == 1 and "is a 2-step progressive student; sample it with --steps 2" in result.output


@pytest.mark.parametrize("method", ["consistency", "dmd"])
def test_a_consistency_or_dmd_student_exports_as_an_lcm_scheduler_that_reproduces_ddim_sample(tmp_path, method):
    from test_distill import SMALL

    teacher = make_run(tmp_path / "teacher", prediction="v", num_classes=10, patch_size=2)
    student = tmp_path / "student"
    small = [*SMALL[2:], "--set", "distill.regression_pairs=16", "--set", "distill.teacher_steps=4"]
    ok("distill", teacher, "--steps", 4 if method == "dmd" else 2, *small, "--method", method, "--run-dir", student)
    cli_ok("export", student, "--out", tmp_path / "out")
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and not (tmp_path / "out" / "model_index.json").exists()
    lcm = LCMScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    loaded = load_model(resolve_checkpoint(student)[0][0])
    for count in (1, 2, 4):  # what the student serves (8 grid points, or the dmd student's own 4 steps)
        lcm.set_timesteps(count)
        assert lcm.timesteps.tolist() == consistency_times(50, loaded.config.distill.grid_size, count).tolist()

    code = (tmp_path / "out" / "README.md").read_text().split("```python\n")[1].split("```")[0]
    code = code.replace("THIS_FOLDER", str(tmp_path / "out"))
    for steps in (1, 2, 4):  # one step, then steps that re-noise with each image's own noise
        scope = {}
        exec(
            code.replace("set_timesteps(4)" if method == "dmd" else "set_timesteps(2)", f"set_timesteps({steps})"),
            scope,
        )
        ok("sample", student, "--n", 4, "--steps", steps, "--npz", tmp_path / "s.npz", "--out", tmp_path / "g.png")
        ours = np.load(tmp_path / "s.npz")["arr_0"]
        assert np.abs(to_uint8(scope["images"]).astype(int) - ours.astype(int)).max() <= 1, steps
    cli_ok("convert", tmp_path / "out", "--out", tmp_path / "back.safetensors")  # the same student again
    for steps in (1, 2):
        for name, source in (("a", student), ("b", tmp_path / "back.safetensors")):
            ok(
                "sample",
                source,
                "--n",
                4,
                "--steps",
                steps,
                "--npz",
                tmp_path / f"{name}.npz",
                "--out",
                tmp_path / "g.png",
            )
        assert np.array_equal(np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]), steps
