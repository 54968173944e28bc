"""Export a checkpoint to diffusers' ``save_pretrained`` layout, so the ecosystem can use it.

``OUT/unet/`` holds a ``UNet2DModel`` (``config.json`` and ``diffusion_pytorch_model.safetensors``),
``OUT/scheduler/`` a ``DDIMScheduler`` config with our schedule, prediction target, clipping and
spacing, and ``OUT/model_index.json`` makes ``DDIMPipeline.from_pretrained(OUT)`` load both. The
U-Net is the DDPM one that :mod:`ddim_cli.convert` imports; this is that renaming in reverse, and
the export checks that importing it again gives back every weight. A class-conditional model
becomes ``num_class_embeds = num_classes + 1`` (the last embedding is our null label; diffusers
adds the class embedding to the time embedding after its MLP, as we do). diffusers is not needed
to export.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ddim_cli.checkpoint import write_durably
from ddim_cli.config import Config
from ddim_cli.convert import DIFFUSERS_PREDICTIONS, DIFFUSERS_SCHEDULES, rename_diffusers

FORMATS = ("diffusers",)
DIFFUSERS_VERSION = "0.30.0"  # recorded in the configs, as save_pretrained does (informational)
# Our spacing -> diffusers' timestep_spacing (ours "uniform" is diffusers' "leading" with steps_offset 0).
_SPACINGS = {"uniform": "leading", "linspace": "linspace", "trailing": "trailing"}
_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class ExportError(RuntimeError):
    """The checkpoint cannot be exported in that format; described in one line."""


def export_diffusers(config: Config, weights: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """Write ``weights`` (our U-Net's state dict) and ``config`` as a diffusers pipeline in ``out``."""
    if config.model.patch_size != 1:
        raise ExportError(
            f"model.patch_size {config.model.patch_size} cannot be exported: diffusers' UNet2DModel has no "
            "pixel-unshuffle patching, so only patch_size 1 models have a diffusers equivalent"
        )
    levels = len(config.model.ch_mult)
    state = {_diffusers_key(key, levels): _diffusers_value(key, value) for key, value in weights.items()}
    back = rename_diffusers(state, levels)
    if back.keys() != weights.keys() or any(not torch.equal(back[k], weights[k]) for k in weights):
        raise AssertionError("the diffusers renaming does not invert the import's")  # a bug, never the user's
    out = Path(out)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    files = {
        out / "unet" / "config.json": _json(unet_config(config)),
        out / "unet" / "diffusion_pytorch_model.safetensors": save(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata={"format": "pt"}
        ),
        out / "scheduler" / "scheduler_config.json": _json(scheduler_config(config)),
        out / "model_index.json": _json(
            {
                "_class_name": "DDIMPipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "scheduler": ["diffusers", "DDIMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            }
        ),
    }
    for path, data in files.items():
        write_durably(path, data)
    return list(files)


def unet_config(config: Config) -> dict[str, Any]:
    """The ``UNet2DModel`` config of our U-Net (single-head attention: ``attention_head_dim`` None
    makes each attention block's head as wide as its channels)."""
    m, size = config.model, config.data.image_size
    channels = [m.ch * mult for mult in m.ch_mult]
    attended = [size // 2**level in m.attn_resolutions for level in range(len(channels))]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": size,
        "in_channels": config.data.channels,
        "out_channels": config.data.channels,
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


def scheduler_config(config: Config) -> dict[str, Any]:
    """A ``DDIMScheduler`` config giving our schedule (named where diffusers has the same formula,
    else as ``trained_betas``), prediction target, clipping and default spacing; the last step goes
    to ``alpha_bar = 1`` as ours does (``set_alpha_to_one``)."""
    d, sample = config.diffusion, config.sample
    named = {ours: theirs for theirs, ours in DIFFUSERS_SCHEDULES.items()}
    scheduler: dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": d.num_timesteps,
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
        "beta_schedule": named.get(d.schedule, "linear"),
        "trained_betas": None,
        "clip_sample": bool(sample.clip_x0),
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": {ours: theirs for theirs, ours in DIFFUSERS_PREDICTIONS.items()}[config.model.prediction],
        "thresholding": False,
        "timestep_spacing": _SPACINGS.get(sample.skip, "leading"),
        "rescale_betas_zero_snr": bool(d.rescale_zero_terminal_snr),
    }
    if d.schedule not in named:
        betas = 1 - config.alpha_bars() / torch.cat([torch.ones(1, dtype=torch.float64), config.alpha_bars()[:-1]])
        scheduler |= {"beta_schedule": "linear", "trained_betas": betas.tolist(), "rescale_betas_zero_snr": False}
    if sample.skip not in _SPACINGS:
        warnings.warn(
            f"diffusers has no {sample.skip!r} spacing; the exported scheduler uses 'leading' (our 'uniform')",
            stacklevel=2,
        )
    return scheduler


def _diffusers_key(key: str, levels: int) -> str:
    """Our (the DDPM) name of a weight -> UNet2DModel's."""
    parts = key.split(".")
    fixed = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2"}
    fixed |= {"norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out", "label_emb": "class_embedding"}
    for ours, theirs in fixed.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    if parts[0] == "mid":
        index = {"block_1": ("resnets", 0), "attn_1": ("attentions", 0), "block_2": ("resnets", 1)}[parts[1]]
        return f"mid_block.{index[0]}.{index[1]}.{_part(parts[2:], index[0])}"
    side, level, kind = parts[0], int(parts[1]), parts[2]
    block = f"{side}_blocks.{level if side == 'down' else levels - 1 - level}"
    if kind in ("downsample", "upsample"):
        return f"{block}.{kind}rs.0.{'.'.join(parts[3:])}"
    kinds = {"block": "resnets", "attn": "attentions"}
    return f"{block}.{kinds[kind]}.{parts[3]}.{_part(parts[4:], kinds[kind])}"


def _part(rest: list[str], kind: str) -> str:
    names = _RESNET if kind == "resnets" else _ATTENTION
    return ".".join([names[rest[0]], *rest[1:]])


def _diffusers_value(key: str, value: torch.Tensor) -> torch.Tensor:
    """Our attention's 1x1 convolutions are diffusers' linear layers."""
    attention = any(f".{name}." in f".{key}" for name in ("q", "k", "v", "proj_out")) and ".attn" in f".{key}"
    return value[:, :, 0, 0] if attention and value.dim() == 4 else value


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
