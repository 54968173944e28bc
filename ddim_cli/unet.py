"""The DDPM U-Net (Ho et al. 2020) exactly as in the DDIM paper's code, as an eps-prediction network.

Module names and parameter shapes follow ermongroup/ddim's ``models/diffusion.py`` (and
pesser/pytorch_diffusion), so the published DDPM state dicts load into :class:`UNet` unchanged, and
the arithmetic is the same: the tensor2tensor sinusoidal embedding, GroupNorm(32, eps=1e-6), swish,
single-head attention scaled by ``C ** -0.5``, zero-padded stride-2 downsampling convs and
nearest-neighbour upsampling.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32


@dataclass
class UNetConfig:
    ch: int = 128  # base channel count; the timestep embedding has 4 * ch channels
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # channel multiplier per resolution level
    num_res_blocks: int = 2  # ResNet blocks per level on the way down (one more on the way up)
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    dropout: float = 0.1  # dropout inside every ResNet block
    in_channels: int = 3  # image channels
    out_ch: int | None = None  # output channels; None means in_channels (eps prediction)
    resolution: int = 32  # image height and width
    resamp_with_conv: bool = True  # learned 3x3 convs in down/upsampling (as in DDPM)
    num_classes: int | None = None  # class-conditional with this many classes (+1 null label)
    # Pixels per side folded into channels before the first conv and unfolded after the last
    # (pixel unshuffle/shuffle, as simple diffusion's and DiT's patching): the U-Net runs at
    # resolution / patch_size. 1 is the DDPM U-Net.
    patch_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of DDPM (tensor2tensor's form): ``[sin(t w_k), cos(t w_k)]`` with
    ``w_k = exp(-k log(10000) / (dim/2 - 1))``, computed in float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 "network in network" shortcut where the width changes (DDPM's default).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # In-place where autograd allows it (about 3% of a CPU forward): a convolution's backward
        # needs its input, not its output, so the adds may overwrite conv outputs; SiLU's
        # backward needs its input, so it overwrites the GroupNorm output only without autograd.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h += self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        h += x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def tokens(conv: nn.Conv2d) -> torch.Tensor:  # (b, 1 head, h*w, c)
            return conv(normed).reshape(b, 1, c, h * w).transpose(2, 3)

        # SDPA's default scale 1/sqrt(c) is the DDPM code's w_ * int(c) ** -0.5.
        attended = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = self.proj_out(attended.transpose(2, 3).reshape(b, c, h, w))
        out += x
        return out


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        # TensorFlow's "SAME" padding for a stride-2 conv: pad right and bottom only.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class UNet(nn.Module):
    """``eps = UNet(config)(x, t, y=None)``: the noise in ``x_t`` at training timesteps ``t``.

    ``x`` is ``(N, in_channels, resolution, resolution)``, ``t`` a 1-D tensor of N timesteps. A
    class-conditional model (``num_classes`` set) takes labels ``y`` in ``0 .. num_classes``; label
    ``num_classes`` (also used when ``y`` is None) is the null label of classifier-free guidance.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        check_config(config)
        self.config = config
        ch, ch_mult, n_blocks = config.ch, tuple(config.ch_mult), config.num_res_blocks
        self.temb_ch = 4 * ch
        self.num_resolutions = len(ch_mult)

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.label_emb = nn.Embedding(config.num_classes + 1, self.temb_ch) if config.num_classes is not None else None
        patch_pixels = config.patch_size**2
        self.conv_in = nn.Conv2d(config.in_channels * patch_pixels, ch, 3, padding=1)

        def resnet(cin: int, cout: int) -> ResnetBlock:
            return ResnetBlock(cin, cout, self.temb_ch, config.dropout)

        res = config.resolution // config.patch_size
        in_mult = (1,) + ch_mult
        skip_channels = [ch]  # channels of every tensor the down path hands to the up path
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[level], ch * mult
            for _ in range(n_blocks):
                stage.block.append(resnet(block_in, block_out))
                block_in = block_out
                if res in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
                skip_channels.append(block_in)
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in, config.resamp_with_conv)
                res //= 2
                skip_channels.append(block_in)
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = resnet(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = resnet(block_in, block_in)

        up_stages = []
        for level in reversed(range(self.num_resolutions)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(n_blocks + 1):
                stage.block.append(resnet(block_in + skip_channels.pop(), block_out))
                block_in = block_out
                if res in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in, config.resamp_with_conv)
                res *= 2
            up_stages.insert(0, stage)  # self.up[level] is the stage at that resolution level
        self.up = nn.ModuleList(up_stages)

        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, (config.out_ch or config.in_channels) * patch_pixels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        label_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``label_embedding`` (N, 4 ch), instead of ``y``, conditions on any vector in the space of
        ``label_emb``'s rows; null-text inversion optimises the null label's that way."""
        # The embedding is computed in float32 (as in DDPM) and handed on in the weights' dtype.
        emb = timestep_embedding(t, self.config.ch).to(self.temb.dense[0].weight.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](emb)))
        if self.label_emb is None:
            if y is not None or label_embedding is not None:
                raise ValueError("labels were given to an unconditional model (num_classes is None)")
        elif label_embedding is not None:
            if y is not None:
                raise ValueError("give labels y or a label_embedding, not both")
            temb = temb + label_embedding.to(temb.dtype)
        else:
            if y is None:
                y = torch.full_like(t, self.config.num_classes, dtype=torch.long)
            temb = temb + self.label_emb(y)

        patch = self.config.patch_size
        hs = [self.conv_in(F.pixel_unshuffle(x, patch) if patch > 1 else x)]
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(hs[-1], temb)
                hs.append(stage.attn[i](h) if stage.attn else h)
            if level != self.num_resolutions - 1:
                hs.append(stage.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if stage.attn:
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, patch) if patch > 1 else out


def check_config(config: UNetConfig) -> None:
    """Raise ValueError naming the field if the U-Net cannot be built from ``config``."""
    for name in ("ch", "num_res_blocks", "in_channels", "resolution", "patch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
    if not config.ch_mult or any(int(m) < 1 for m in config.ch_mult):
        raise ValueError(f"model.ch_mult must be a non-empty list of positive integers, got {config.ch_mult!r}")
    widths = sorted({config.ch * m for m in config.ch_mult} | {config.ch})
    if any(w % NORM_GROUPS for w in widths):
        raise ValueError(
            f"GroupNorm uses {NORM_GROUPS} groups, so every width ch * ch_mult must be a multiple of "
            f"{NORM_GROUPS}; got widths {widths} from ch={config.ch}, ch_mult={list(config.ch_mult)}"
        )
    downsamplings = len(config.ch_mult) - 1
    if config.resolution % (config.patch_size * 2**downsamplings):
        raise ValueError(
            f"model.resolution {config.resolution} must be divisible by {config.patch_size * 2**downsamplings} "
            f"(patch_size {config.patch_size} times one halving per ch_mult level after the first)"
        )
    level_sizes = [config.resolution // config.patch_size // 2**level for level in range(len(config.ch_mult))]
    unused = sorted(set(config.attn_resolutions) - set(level_sizes))
    if unused:
        raise ValueError(f"model.attn_resolutions {unused} match no feature-map size; this model has {level_sizes}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {config.dropout}")
    if config.num_classes is not None and (isinstance(config.num_classes, bool) or config.num_classes < 1):
        raise ValueError(f"model.num_classes must be a positive integer or null, got {config.num_classes!r}")
