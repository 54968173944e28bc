"""Converted weights must compute the same function; our DDIM must match diffusers' DDIMScheduler."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from oracles import gaussian_eps_model, gaussian_model  # noqa: E402
from typer.testing import CliRunner

from ddim_cli.cli import app  # noqa: E402
from ddim_cli.convert import ConversionError, convert, preset_config  # noqa: E402
from ddim_cli.models import load_model  # noqa: E402
from ddim_cli.sampling import sample  # noqa: E402
from ddim_cli.schedule import alpha_bars, timesteps  # noqa: E402
from ddim_cli.unet import UNet, UNetConfig  # noqa: E402

DDPM_FAMILY = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    attention_head_dim=None,
    act_fn="silu",
)


def random_diffusers_unet(**overrides):
    torch.manual_seed(0)
    model = UNet2DModel(**{**DDPM_FAMILY, **overrides}).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # norms start at 1/0: randomise everything
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def eps_pair(ours, theirs, size=16, channels=3):
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 437, 999])
    with torch.no_grad():
        return ours(x, t), theirs(x, t).sample


@pytest.mark.parametrize("safe", [True, False])
def test_diffusers_unet_converts_to_the_same_function(tmp_path, safe):
    theirs = random_diffusers_unet()
    theirs.save_pretrained(tmp_path / "unet", safe_serialization=safe)
    path = convert(tmp_path / "unet", tmp_path / "ours.safetensors")
    loaded = load_model(path)
    assert loaded.config.model.ch_mult == (1, 2, 2) and loaded.config.model.attn_resolutions == (8,)
    ours_eps, their_eps = eps_pair(loaded.model, theirs)
    torch.testing.assert_close(ours_eps, their_eps, rtol=0, atol=1e-5)


def test_a_saved_pipeline_brings_its_schedule(tmp_path):
    theirs = random_diffusers_unet()
    scheduler = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    DDPMPipeline(unet=theirs, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    loaded = load_model(convert(tmp_path / "pipe", tmp_path / "ours.safetensors"))
    d = loaded.config.diffusion
    assert (d.schedule, d.num_timesteps, loaded.config.sample.clip_x0) == ("cosine", 500, False)
    torch.testing.assert_close(loaded.alpha_bars.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    ours_eps, their_eps = eps_pair(loaded.model, theirs)
    torch.testing.assert_close(ours_eps, their_eps, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(attention_head_dim=8), "multi-head attention"),
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(flip_sin_to_cos=True), "timestep embedding"),
        (dict(norm_eps=1e-5), "norm_eps"),
        (dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D")), "down_block_types"),
    ],
)
def test_architectures_outside_the_family_are_refused_by_name(tmp_path, overrides, message):
    config = {**DDPM_FAMILY, **overrides, "_class_name": "UNet2DModel"}
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "unet", tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    ("prediction_type", "ours", "zero_snr"),
    [("v_prediction", "v", True), ("sample", "x0", False), ("epsilon", "eps", False)],
)
def test_a_pipelines_prediction_type_and_zero_snr_schedule_convert(tmp_path, prediction_type, ours, zero_snr):
    scheduler = DDPMScheduler(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    DDPMPipeline(unet=random_diffusers_unet(), scheduler=scheduler).save_pretrained(tmp_path / "p")
    loaded = load_model(convert(tmp_path / "p", tmp_path / "x.safetensors"))
    assert loaded.config.model.prediction == ours
    assert loaded.config.diffusion.rescale_zero_terminal_snr == zero_snr
    torch.testing.assert_close(loaded.alpha_bars.float(), scheduler.alphas_cumprod, rtol=1e-4, atol=1e-7)
    (tmp_path / "p" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "flow"}))
    with pytest.raises(ConversionError, match="prediction_type 'flow' is not supported"):
        convert(tmp_path / "p", tmp_path / "y.safetensors")


TINY_YAML = """
data: {image_size: 16, channels: 3}
model: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0}
diffusion: {schedule: linear, num_timesteps: 1000}
"""


def original_state_dict():
    torch.manual_seed(3)
    model = UNet(UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, resolution=16))
    return model.eval(), {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["state_dict", "ddim_code_list", "data_parallel"])
def test_original_layout_converts_with_a_config(tmp_path, layout):
    model, state = original_state_dict()
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    if layout == "state_dict":
        torch.save(state, tmp_path / "model.ckpt")
    elif layout == "ddim_code_list":  # the DDIM code's ckpt.pth: [model, optimizer, epoch, step, ema]
        torch.save([{k: torch.zeros_like(v) for k, v in state.items()}, {}, 1, 2, state], tmp_path / "model.ckpt")
    else:
        torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "model.ckpt")
    result = CliRunner().invoke(
        app,
        [
            "convert",
            str(tmp_path / "model.ckpt"),
            "--config",
            str(tmp_path / "tiny.yaml"),
            "--out",
            str(tmp_path / "ours.safetensors"),
        ],
    )
    assert result.exit_code == 0, result.output
    loaded = load_model(tmp_path / "ours.safetensors")
    model.load_state_dict(state)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t), model(x, t), rtol=0, atol=0)


def test_the_cifar10_preset_is_the_papers_35_7m_model(tmp_path):
    config = preset_config("cifar10")
    model = UNet(config.unet_config())
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    torch.save(model.state_dict(), tmp_path / "model-790000.ckpt")
    loaded = load_model(convert(tmp_path / "model-790000.ckpt", tmp_path / "cifar10.safetensors", preset="cifar10"))
    assert loaded.config.name == "cifar10" and loaded.config.sample.skip == "quad"


def test_a_diffusers_copy_of_a_preset_is_recognised(tmp_path):
    # google/ddpm-cifar10-32's architecture: the paper's CIFAR-10 model, so `compare` shows Table 1.
    config = {
        **DDPM_FAMILY,
        "sample_size": 32,
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    }
    UNet2DModel(**config).save_pretrained(tmp_path / "ddpm-cifar10-32")
    loaded = load_model(convert(tmp_path / "ddpm-cifar10-32", tmp_path / "c.safetensors"))
    assert loaded.config.name == "cifar10"
    random_diffusers_unet().save_pretrained(tmp_path / "unet_small")
    assert load_model(convert(tmp_path / "unet_small", tmp_path / "s.safetensors")).config.name == "unet_small"


def test_conversion_errors_are_one_line(tmp_path):
    _, state = original_state_dict()
    torch.save(state, tmp_path / "model.ckpt")
    runner = CliRunner()
    no_preset = runner.invoke(app, ["convert", str(tmp_path / "model.ckpt"), "--out", str(tmp_path / "o.safetensors")])
    assert no_preset.exit_code == 1 and "give --preset or --config" in no_preset.output
    wrong = runner.invoke(
        app, ["convert", str(tmp_path / "model.ckpt"), "--preset", "cifar10", "--out", str(tmp_path / "o.safetensors")]
    )
    assert wrong.exit_code == 1 and "do not fit the cifar10 architecture" in wrong.output
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04\x95 not a pickle of tensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = runner.invoke(
            app,
            ["convert", str(tmp_path / "evil.ckpt"), "--preset", "cifar10", "--out", str(tmp_path / "o.safetensors")],
        )
    assert bad.exit_code == 1 and "weights_only=True" in bad.output
    # The unpickler's own reason, not torch's general advice; no warning about the pickle protocol.
    assert bad.output.strip().endswith("(it must hold tensors only): Unsupported operand 149")
    assert not [w for w in caught if "pickle protocol" in str(w.message)]
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    ("config_json", "message"),
    [("{bad json", "cannot read .*config.json: Expecting property name"), ("[1]", "holds a JSON list, not an object")],
)
def test_a_diffusers_folder_with_a_broken_config_json_is_a_one_line_error(tmp_path, config_json, message):
    random_diffusers_unet().save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(config_json)
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "unet", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "content",
    [b"hi\n", b"J\x00", b"\x80\x02q\x00.", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R."],
    ids=["text (KeyError)", "short int (struct.error)", "empty memo (IndexError)", "bad call (TypeError)"],
)
def test_a_file_that_is_no_pickle_is_a_one_line_error(tmp_path, content):
    # torch's unpickler raises these from deep inside on text or damaged bytes; they once came out
    # as "internal error (KeyError: 105); this is a bug".
    (tmp_path / "model.ckpt").write_bytes(content)
    bad = CliRunner().invoke(
        app, ["convert", str(tmp_path / "model.ckpt"), "--preset", "cifar10", "--out", str(tmp_path / "o.safetensors")]
    )
    assert bad.exit_code == 1 and "not a torch.save file, or a damaged one" in bad.output
    assert "internal error" not in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


# --- the same sampler as diffusers' DDIMScheduler -------------------------------------------------
def diffusers_ddim(unet, x_T, T, S, eta, clip, noise_seed):
    scheduler = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=clip,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(S)
    assert scheduler.timesteps.tolist() == timesteps(T, S, "uniform").tolist()
    noise = torch.Generator().manual_seed(noise_seed)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            variance_noise = torch.randn(x.shape, generator=noise) if eta > 0 else None
            x = scheduler.step(unet(x, t).sample, t, x, eta=eta, variance_noise=variance_noise).prev_sample
    return x, scheduler.alphas_cumprod.double()


@pytest.mark.parametrize(("eta", "clip"), [(0.0, False), (0.0, True), (0.5, False), (1.0, True)])
def test_ddim_matches_diffusers_ddim_scheduler_step_for_step(eta, clip):
    # One noise model on both sides (the exact denoiser of N(0.3, 0.6^2) data, so differences do
    # not grow) and diffusers' own alpha_bar table (built in float32; ours is float64 and differs
    # by up to 2.5e-7) isolate the update: our uniform spacing is their "leading" one with
    # steps_offset=0, alpha_bar = 1 after the last step (set_alpha_to_one), clipping keeps the
    # model's eps (use_clipped_model_output=False), and eta enters through Eq. 16.
    x_T = 1.5 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    probe = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    their_table = probe.alphas_cumprod.double()
    torch.testing.assert_close(their_table, alpha_bars("linear", 1000), rtol=0, atol=3e-7)
    oracle = gaussian_eps_model(0.3, 0.6, their_table)

    class Wrapped:  # diffusers calls unet(x, t).sample with a scalar t
        def __call__(self, x, t):
            return SimpleNamespace(sample=oracle(x, t.expand(len(x)).long()))

    expected, _ = diffusers_ddim(Wrapped(), x_T, 1000, 10, eta, clip, noise_seed=9)
    ours = sample(
        oracle, x_T, their_table, timesteps(1000, 10), eta=eta, clip_x0=clip, generator=torch.Generator().manual_seed(9)
    )
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)


def test_converted_weights_and_our_sampler_give_diffusers_images(tmp_path):
    theirs = random_diffusers_unet()
    theirs.save_pretrained(tmp_path / "unet")
    loaded = load_model(convert(tmp_path / "unet", tmp_path / "ours.safetensors"))
    x_T = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    expected, _ = diffusers_ddim(theirs, x_T, 1000, 10, 0.0, False, noise_seed=0)
    ours = sample(loaded.model, x_T, loaded.alpha_bars, timesteps(1000, 10))
    # Float32 roundings differ (their alpha_bar table and coefficients; the timestep embedding,
    # where theirs divides and DDPM's code multiplies) and 1/sqrt(alpha_bar) of the first steps
    # amplifies them: about 1e-4 on values of order 1 after 10 steps of an untrained network.
    assert (ours - expected).abs().max() < 5e-4


@pytest.mark.parametrize(("prediction", "their_type"), [("v", "v_prediction"), ("x0", "sample")])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_and_x0_sampling_matches_diffusers_step_for_step(prediction, their_type, zero_snr):
    # diffusers' DDIMScheduler with prediction_type v/sample, trailing spacing and, optionally, the
    # zero-terminal-SNR rescale (its first step then starts from pure noise, alpha_bar = 0).
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        prediction_type=their_type,
        rescale_betas_zero_snr=zero_snr,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == timesteps(1000, 10, "trailing").tolist()
    their_table = scheduler.alphas_cumprod.double()
    assert (their_table[-1] == 0) == zero_snr
    oracle = gaussian_model(0.3, 0.6, their_table, prediction)
    x_T = 1.5 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t.expand(len(x)).long()), t, x, eta=0.0).prev_sample
    ours = sample(oracle, x_T, their_table, timesteps(1000, 10, "trailing"), prediction=prediction)
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-6)
