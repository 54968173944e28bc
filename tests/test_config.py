import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ddim_cli.cli import app
from ddim_cli.config import Config, ConfigError, config_from_dict, load_config, resume_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path):
    config = load_config(path)
    assert config.name == path.stem
    assert config_from_dict(config.to_dict()) == config


def test_cifar10_config_is_the_papers_setting():
    c = load_config(Path(__file__).parent.parent / "configs" / "cifar10.yaml")
    assert (c.model.ch, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_resolutions) == (
        128,
        (1, 2, 2, 2),
        2,
        (16,),
    )
    assert (c.model.dropout, c.diffusion.schedule, c.diffusion.beta_start, c.diffusion.beta_end) == (
        0.1,
        "linear",
        1e-4,
        0.02,
    )
    assert (c.diffusion.num_timesteps, c.train.lr, c.train.warmup, c.train.batch_size) == (1000, 2e-4, 5000, 128)
    assert (c.train.grad_clip, c.train.ema_decay, c.train.steps, c.data.random_flip) == (1.0, 0.9999, 800_000, True)


def test_the_documented_train_keys_exist():
    train = Config().train
    for key in [
        "steps",
        "batch_size",
        "lr",
        "seed",
        "checkpoint_every",
        "sample_every",
        "keep_checkpoints",
        "precision",
        "loss_weighting",
        "min_snr_gamma",
        "lr_schedule",
        "fid_every",
        "fid_samples",
    ]:
        assert hasattr(train, key)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  bach_size: 4\n", "unknown key 'train.bach_size' (did you mean 'train.batch_size'?)"),
        ("trian:\n  steps: 4\n", "unknown key 'trian' (did you mean 'train'?)"),
        ("train:\n  batch_size: many\n", "train.batch_size: expected an integer, got 'many'"),
        ("train:\n  lr: -1\n", "train.lr: must be > 0"),
        ("train:\n  precision: fp16\n", "train.precision: expected one of auto, fp32, tf32, bf16, got 'fp16'"),
        ("train:\n  compile: 1\n", "train.compile: expected one of auto, true, false, got 1"),
        ("model:\n  ch_mult: 2\n", "model.ch_mult: expected a list"),
        ("model:\n  ch: 48\n", "multiple of 32"),
        ("data:\n  image_size: 18\n", "data.image_size: 18 must be divisible by 2**2"),
        ("model:\n  patch_size: 3\n", "data.image_size: 16 must be divisible by 3 * 2**2 for model.patch_size 3"),
        ("model:\n  patch_size: 0\n", "model.patch_size must be a positive integer, got 0"),
        ("train: 5\n", "train: expected a mapping"),
        ("sample:\n  steps: 2000\n", "sample.steps: must be from 1 to diffusion.num_timesteps=1000"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("model:\n  prediction: noise\n", "model.prediction: expected one of eps, x0, v, got 'noise'"),
        ("diffusion:\n  rescale_zero_terminal_snr: true\n", "needs model.prediction v or x0"),
        ("train:\n  loss_weighting: snr\n", "train.loss_weighting: expected one of none, min_snr"),
        ("train:\n  min_snr_gamma: 0\n", "train.min_snr_gamma: must be > 0"),
        ("train:\n  lr_schedule: linear\n", "train.lr_schedule: expected one of constant, cosine"),
        ("train:\n  fid_samples: 1\n", "train.fid_samples: must be >= 2"),
        ("sample:\n  guidance: 2\n", "sample.guidance: needs a class-conditional model"),
        ("sample:\n  guidance: -1\n", "sample.guidance: must be >= 0"),
        ("sample:\n  guidance_rescale: 1.5\n", "sample.guidance_rescale: must be in [0, 1]"),
    ],
)
def test_bad_configs_give_one_line_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_config_that_is_not_utf8_text_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe\x00train:")  # once an internal error (UnicodeDecodeError)
    with pytest.raises(ConfigError, match=r"c\.yaml is not UTF-8 text: invalid start byte at byte 0"):
        load_config(tmp_path / "c.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+: malformed YAML"):
        load_config(path)


def test_overrides_are_typed_by_the_field(tmp_path):
    path = write(tmp_path, "")
    c = load_config(
        path,
        [
            "train.batch_size=64",
            "model.dropout=0",
            "model.ch_mult=[1,2]",
            "data.root=some dir",
            "model.num_classes=null",
            "train.compile=true",
            "train.lr=2e-4",
        ],
    )
    assert c.train.lr == 2e-4 and isinstance(c.train.lr, float)  # YAML 1.1 reads 2e-4 as a string
    assert load_config(write(tmp_path, "train:\n  lr: 1E-3\n")).train.lr == 1e-3
    assert c.train.batch_size == 64 and c.model.dropout == 0.0 and isinstance(c.model.dropout, float)
    assert c.model.ch_mult == (1, 2) and c.data.root == "some dir" and c.model.num_classes is None
    assert c.train.compile is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=1.5", "train.batch_size: expected an integer"),
        ("train.btach_size=4", "did you mean 'train.batch_size'"),
        ("train=4", "train is a section"),
        ("train.steps.x=4", "train.steps is not a section"),
        ("nonsense", "must look like section.key=value"),
        ("train.lr=1e-3x", "train.lr: expected a number, got '1e-3x'"),
        ("sample.eta=.inf", "sample.eta: expected a finite number, got inf"),
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("sample.guidance=1e999", "sample.guidance: expected a finite number, got inf"),
        ("train.compile=yes please", "train.compile: expected one of auto, true, false, got 'yes please'"),
    ],
)
def test_bad_overrides_raise(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(write(tmp_path, ""), [override])


def test_cli_config_errors_exit_2_with_one_line(tmp_path):
    result = CliRunner().invoke(app, ["train", str(write(tmp_path, "")), "--set", "train.bach_size=3"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: unknown key 'train.bach_size' (did you mean 'train.batch_size'?)"
    ]
    missing = CliRunner().invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "cannot read config" in missing.output and "Traceback" not in missing.output


def test_cli_dry_run_prints_the_resolved_config(tmp_path):
    result = CliRunner().invoke(
        app, ["train", str(write(tmp_path, "train:\n  steps: 7\n")), "--dry-run", "--set", "train.lr=0.5"]
    )
    assert result.exit_code == 0
    resolved = config_from_dict(__import__("yaml").safe_load(result.output))
    assert resolved.train.steps == 7 and resolved.train.lr == 0.5 and resolved.name == "c"
    assert not (tmp_path / "runs").exists()


def test_cli_needs_exactly_one_of_config_and_resume(tmp_path):
    assert CliRunner().invoke(app, ["train"]).exit_code == 2
    both = CliRunner().invoke(app, ["train", str(write(tmp_path, "")), "--resume", str(tmp_path)])
    assert both.exit_code == 2 and "not both" in both.output


def test_a_resumed_run_keeps_what_its_weights_were_trained_for(tmp_path):
    path = write(tmp_path, "model:\n  prediction: v\n  num_classes: 10\ntrain:\n  steps: 10\n")
    changes = ["train.steps=20", "train.lr=1e-4", "model.prediction=v", "data.num_workers=0", "model.dropout=0.3"]
    config = resume_config(path, changes)  # model.prediction=v: its own value, as a requeue repeats it
    assert config.train.steps == 20 and config.model.prediction == "v" and config.model.dropout == 0.3
    for override, message in [
        ("model.prediction=eps", "model.prediction cannot change when a run is resumed ('v' -> 'eps')"),
        ("model.ch=96", "model.ch cannot change"),
        ("diffusion.schedule=sigmoid", "diffusion.schedule cannot change"),
        ("data.image_size=32", "data.image_size cannot change"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            resume_config(path, ["train.steps=20", override])
