"""Import published DDPM weights into ddim-cli checkpoints.

Two sources of the same network (Ho et al.'s DDPM U-Net):

* the original layout used by the DDIM code (ermongroup/ddim, pesser/pytorch_diffusion): a state
  dict with keys ``temb.dense.*``, ``down.{i}.block.{j}.*``, ``mid.block_1.*``, ... Our U-Net uses
  these very names, so the weights load as they are; the architecture comes from ``--preset`` or a
  config file, since the file does not record it;
* a ``diffusers`` ``UNet2DModel`` directory of the DDPM family (``google/ddpm-cifar10-32``, ...):
  ``config.json`` plus ``diffusion_pytorch_model.safetensors`` (or ``.bin``), renamed key by key,
  with the noise schedule from ``scheduler_config.json`` when one is found. A folder that ``ddim
  export`` wrote also holds the whole ddim-cli config (``ddim-cli.yaml``): it comes back as it was,
  with what diffusers' configs cannot say (patches, the sampling defaults, a student's method).

``.bin``/``.ckpt``/``.pth`` files are read with ``torch.load(weights_only=True)``: tensors only,
never code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ddim_cli.checkpoint import UNPICKLE_ERRORS, describe_mismatch, load_tensors_only, unpickle_reason, write_weights
from ddim_cli.config import Config, ConfigError, config_from_dict, load_config
from ddim_cli.unet import UNet

_LSUN = {
    "data": {"image_size": 256, "channels": 3},
    "model": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0},
}
# The DDIM code's configs/*.yml for the published DDPM weights (all: linear betas 1e-4..0.02, T 1000).
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "data": {"image_size": 32, "channels": 3},
        "model": {"ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.1},
        "sample": {"skip": "quad"},  # the paper's choice for CIFAR-10
    },
    "celeba": {
        "data": {"image_size": 64, "channels": 3},
        "model": {"ch": 128, "ch_mult": [1, 2, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.1},
    },
    "lsun-bedroom": _LSUN,
    "lsun-church": _LSUN,
    "lsun-cat": _LSUN,
}
DIFFUSERS_VERSION = "0.30.0"  # recorded in the configs we write, as save_pretrained does (informational)
EXPORTED_CONFIG = "ddim-cli.yaml"  # written by ddim export beside unet/ and scheduler/
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}


class ConversionError(RuntimeError):
    """The source cannot be converted; described in one line."""


def preset_config(name: str) -> Config:
    if name not in PRESETS:
        raise ConversionError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    raw = {
        "name": name,
        "data": {"dataset": "folder", "root": f"data/{name}", **preset["data"]},
        "model": preset["model"],
        "diffusion": {"schedule": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
        "sample": {"steps": 100, "clip_x0": True, **preset.get("sample", {})},
    }
    return config_from_dict(raw)


def matching_preset(config: Config) -> str | None:
    """The preset whose architecture, resolution and schedule ``config`` has (dropout aside), if any."""

    def signature(c: Config) -> tuple:
        m, d = c.model, c.diffusion
        return (
            m.ch,
            m.ch_mult,
            m.num_res_blocks,
            m.attn_resolutions,
            m.patch_size,
            c.data.image_size,
            c.data.channels,
            d.schedule,
            d.num_timesteps,
            d.beta_start,
            d.beta_end,
            m.num_classes,
        )

    ours = signature(config)
    return next((name for name in PRESETS if signature(preset_config(name)) == ours), None)


def convert(source: Path, out: Path, *, preset: str | None = None, config: Config | None = None) -> Path:
    """Convert ``source`` (an original-layout file or a diffusers directory) into checkpoint ``out``.

    The same weights are stored as model and EMA weights (published files hold one set, usually
    the EMA). Returns the path written.
    """
    source = Path(source)
    if source.is_dir():
        if preset or config:
            raise ConversionError("a diffusers directory carries its own config; drop --preset/--config")
        config, weights = _from_diffusers(source)
    else:
        if (preset is None) == (config is None):
            raise ConversionError(
                "an original-layout state dict does not record its architecture: give --preset or --config"
            )
        config = preset_config(preset) if preset else config
        weights = _original_state_dict(source)
    _check_fits(config, weights, source)
    preset_name = matching_preset(config)
    if preset_name and config.name != preset_name:  # e.g. google/ddpm-cifar10-32 is the cifar10 model
        config = config_from_dict({**config.to_dict(), "name": preset_name})
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConversionError(f"--out must end in .safetensors, got {out}")
    write_weights(out, 0, config, weights, weights)
    return out


# --- the original (DDPM / DDIM code) layout -------------------------------------------------------
def _original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    state = _load_tensors(path)
    if isinstance(state, list | tuple):  # the DDIM code's own ckpt.pth: [model, optimizer, epoch, step, ema]
        if len(state) >= 5 and isinstance(state[4], dict) and state[4]:
            state = state[4]
        else:
            state = state[0]
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} is not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _load_tensors(path: Path) -> Any:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"cannot read {path}: {error}") from None
    try:
        return load_tensors_only(path)
    except UNPICKLE_ERRORS as error:
        raise ConversionError(
            f"cannot read {path} with torch.load(weights_only=True) (it must hold tensors only): "
            f"{unpickle_reason(error)}"
        ) from None


# --- diffusers UNet2DModel ----------------------------------------------------------------------
def _from_diffusers(directory: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    unet_dir = directory / "unet" if (directory / "unet" / "config.json").is_file() else directory
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{directory} has no config.json (nor unet/config.json): not a diffusers UNet2DModel")
    unet = _read_json(config_path)
    config = _exported_config(directory, unet_dir, unet) or _config_from_diffusers(
        unet, _scheduler_config(directory, unet_dir), name=directory.name
    )
    weights_file = next(
        (
            unet_dir / name
            for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
            if (unet_dir / name).is_file()
        ),
        None,
    )
    if weights_file is None:
        raise ConversionError(f"{unet_dir} has no diffusion_pytorch_model.safetensors or .bin")
    state = _load_tensors(weights_file)
    return config, rename_diffusers(state, len(unet["block_out_channels"]))


def _scheduler_config(directory: Path, unet_dir: Path) -> dict[str, Any] | None:
    for path in (
        directory / "scheduler" / "scheduler_config.json",
        unet_dir / "scheduler_config.json",
        directory / "scheduler_config.json",
        unet_dir.parent / "scheduler" / "scheduler_config.json",
    ):
        if path.is_file():
            return _read_json(path)
    return None


def _exported_config(directory: Path, unet_dir: Path, unet: dict[str, Any]) -> Config | None:
    """The config ``ddim export`` saved beside the U-Net, if there is one and it describes that U-Net
    (a U-Net changed since, e.g. in diffusers, is refused rather than loaded under the wrong config)."""
    path = next((d / EXPORTED_CONFIG for d in (directory, unet_dir.parent) if (d / EXPORTED_CONFIG).is_file()), None)
    if path is None:
        return None
    try:
        config = load_config(path)
    except ConfigError as error:
        raise ConversionError(f"{path}: {error}") from None
    expected = {key: value for key, value in unet_config(config).items() if key != "_diffusers_version"}
    differing = sorted(key for key, value in expected.items() if unet.get(key) != value)
    if differing:
        raise ConversionError(
            f"{path} describes another U-Net than {unet_dir / 'config.json'} (they differ in {', '.join(differing)}); "
            f"remove {path.name} to convert from the diffusers configs alone"
        )
    return config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConversionError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}, not an object of settings")
    return value


def _config_from_diffusers(unet: dict[str, Any], scheduler: dict[str, Any] | None, name: str) -> Config:
    def need(condition: bool, what: str) -> None:
        if not condition:
            raise ConversionError(f"unsupported UNet2DModel: {what} (only the DDPM U-Net family converts)")

    if unet.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConversionError(f"unsupported model class {unet.get('_class_name')}: only UNet2DModel converts")
    channels = list(unet["block_out_channels"])
    down, up = list(unet["down_block_types"]), list(unet["up_block_types"])
    need(unet.get("act_fn", "silu") == "silu", f"act_fn {unet.get('act_fn')!r}")
    need(unet.get("norm_num_groups", 32) == 32, f"norm_num_groups {unet.get('norm_num_groups')}")
    need(abs(unet.get("norm_eps", 1e-5) - 1e-6) < 1e-12, f"norm_eps {unet.get('norm_eps', 1e-5)} (DDPM uses 1e-6)")
    need(unet.get("time_embedding_type", "positional") == "positional", "time_embedding_type")
    need(
        not unet.get("flip_sin_to_cos", True) and unet.get("freq_shift", 0) == 1,
        "a timestep embedding other than DDPM's (flip_sin_to_cos false, freq_shift 1)",
    )
    need(unet.get("downsample_padding", 1) == 0, "downsample_padding != 0")
    need(
        unet.get("downsample_type", "conv") == "conv" and unet.get("upsample_type", "conv") == "conv",
        "down/upsample_type other than conv",
    )
    need(not unet.get("center_input_sample", False), "center_input_sample")
    need(unet.get("mid_block_scale_factor", 1) == 1, "mid_block_scale_factor != 1")
    need(unet.get("resnet_time_scale_shift", "default") == "default", "resnet_time_scale_shift")
    need(unet.get("add_attention", True), "a middle block without attention")
    need(
        unet.get("mid_block_type", "UNetMidBlock2D") == "UNetMidBlock2D", f"mid_block_type {unet.get('mid_block_type')}"
    )
    need(unet.get("class_embed_type") is None, f"class_embed_type {unet.get('class_embed_type')!r}")
    class_embeds = unet.get("num_class_embeds")
    need(class_embeds is None or class_embeds >= 2, f"num_class_embeds {class_embeds}")
    need(unet.get("time_embedding_dim") in (None, 4 * channels[0]), "time_embedding_dim other than 4 x channels")
    need(unet.get("attn_norm_num_groups") in (None, 32), "attn_norm_num_groups")
    need(
        unet.get("out_channels", 3) == unet.get("in_channels", 3),
        "out_channels != in_channels (a learned variance or another output)",
    )
    need(all(c % channels[0] == 0 for c in channels), f"block_out_channels {channels} not multiples of the first")
    need(set(down) <= {"DownBlock2D", "AttnDownBlock2D"}, f"down_block_types {down}")
    need(set(up) <= {"UpBlock2D", "AttnUpBlock2D"}, f"up_block_types {up}")
    need(len(down) == len(up) == len(channels), "mismatched block counts")
    has_attention = [kind == "AttnDownBlock2D" for kind in down]
    need(has_attention == [kind == "AttnUpBlock2D" for kind in reversed(up)], "up and down attention that differ")
    head_dim = unet.get("attention_head_dim")
    attended = [c for c, a in zip(channels, has_attention, strict=True) if a] + [channels[-1]]
    if head_dim is not None and any(head_dim != c for c in attended):
        raise ConversionError(
            f"unsupported UNet2DModel: multi-head attention (attention_head_dim {head_dim} with {attended} channels); "
            "the DDPM U-Net has one head"
        )

    size = unet["sample_size"]
    size = size[0] if isinstance(size, list | tuple) else size
    raw: dict[str, Any] = {
        "name": name,
        "data": {
            "dataset": "folder",
            "root": f"data/{name}",
            "image_size": size,
            "channels": unet.get("in_channels", 3),
        },
        "model": {
            "ch": channels[0],
            "ch_mult": [c // channels[0] for c in channels],
            "num_res_blocks": unet["layers_per_block"],
            "attn_resolutions": [size // 2**level for level, a in enumerate(has_attention) if a],
            "dropout": unet.get("dropout", 0.0),
            "resamp_with_conv": True,
            "prediction": _prediction_from_scheduler(scheduler),
            # A class-conditional UNet2DModel (as `ddim export` writes it): the last embedding is the null label.
            "num_classes": None if class_embeds is None else class_embeds - 1,
        },
        "diffusion": (diffusion := _diffusion_from_scheduler(scheduler)),
        "sample": {
            "steps": min(100, diffusion["num_timesteps"]),
            "clip_x0": bool((scheduler or {}).get("clip_sample", True)),
        },
    }
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        raise ConversionError(f"unsupported UNet2DModel: {error}") from None


def unet_config(config: Config) -> dict[str, Any]:
    """The ``UNet2DModel`` config of our U-Net (single-head attention: ``attention_head_dim`` None
    makes each attention block's head as wide as its channels)."""
    m = config.model
    size, in_channels = config.data.image_size // m.patch_size, config.data.channels * m.patch_size**2
    channels = [m.ch * mult for mult in m.ch_mult]
    attended = [size // 2**level in m.attn_resolutions for level in range(len(channels))]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attended],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attended)],
        "block_out_channels": channels,
        "layers_per_block": m.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": m.dropout,
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": 32,
        "attn_norm_num_groups": None,
        "norm_eps": 1e-6,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None if m.num_classes is None else m.num_classes + 1,
    }


def _diffusion_from_scheduler(scheduler: dict[str, Any] | None) -> dict[str, Any]:
    if scheduler is None:
        return {"schedule": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    if scheduler.get("trained_betas") is not None:
        raise ConversionError("scheduler_config.json has trained_betas; only named beta schedules convert")
    kind = scheduler.get("beta_schedule", "linear")
    if kind not in DIFFUSERS_SCHEDULES:
        raise ConversionError(f"beta_schedule {kind!r} is not supported ({', '.join(DIFFUSERS_SCHEDULES)} are)")
    return {
        "schedule": DIFFUSERS_SCHEDULES[kind],
        "num_timesteps": scheduler.get("num_train_timesteps", 1000),
        "beta_start": scheduler.get("beta_start", 1e-4),
        "beta_end": scheduler.get("beta_end", 0.02),
        "rescale_zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr", False)),
    }


def _prediction_from_scheduler(scheduler: dict[str, Any] | None) -> str:
    """diffusers' ``prediction_type`` as our ``model.prediction`` (epsilon without a scheduler)."""
    kind = (scheduler or {}).get("prediction_type", "epsilon")
    if kind not in DIFFUSERS_PREDICTIONS:
        raise ConversionError(f"prediction_type {kind!r} is not supported ({', '.join(DIFFUSERS_PREDICTIONS)} are)")
    return DIFFUSERS_PREDICTIONS[kind]


_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time_emb_proj": "temb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}  # new and old diffusers names


def rename_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers' UNet2DModel keys -> the DDPM layout (up_blocks run from low to high resolution)."""
    fixed = {
        "time_embedding.linear_1": "temb.dense.0",
        "time_embedding.linear_2": "temb.dense.1",
        "conv_in": "conv_in",
        "conv_norm_out": "norm_out",
        "conv_out": "conv_out",
        "mid_block.resnets.0": "mid.block_1",
        "mid_block.attentions.0": "mid.attn_1",
        "mid_block.resnets.1": "mid.block_2",
        "class_embedding": "label_emb",
    }
    block = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
    out = {}
    for key, value in state.items():
        new = None
        for prefix, target in fixed.items():
            if key.startswith(prefix + "."):
                rest = key[len(prefix) + 1 :]
                if prefix.startswith("mid_block.resnets"):
                    rest = _rename_part(rest, _RESNET)
                elif prefix.startswith("mid_block.attentions"):
                    rest = _rename_part(rest, _ATTENTION)
                new = f"{target}.{rest}"
        if match := block.match(key):
            side, index, kind, j, rest = match.groups()
            level = int(index) if side == "down" else levels - 1 - int(index)
            if kind == "resnets":
                new = f"{side}.{level}.block.{j}.{_rename_part(rest, _RESNET)}"
            elif kind == "attentions":
                new = f"{side}.{level}.attn.{j}.{_rename_part(rest, _ATTENTION)}"
            else:
                new = f"{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
        if new is None:
            raise ConversionError(f"unexpected UNet2DModel weight {key!r}")
        if any(f".{name}." in f".{new}" for name in ("q", "k", "v", "proj_out")) and value.dim() == 2:
            value = value[:, :, None, None]  # diffusers' linear layers are our 1x1 convolutions
        out[new] = value
    return out


def _rename_part(rest: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise ConversionError(f"unexpected UNet2DModel weight part {rest!r}")


def _check_fits(config: Config, weights: dict[str, torch.Tensor], source: Path) -> None:
    mismatch = describe_mismatch(UNet(config.unet_config()).state_dict(), weights)
    if mismatch:
        raise ConversionError(f"the weights in {source} do not fit the {config.name} architecture: {mismatch}")
