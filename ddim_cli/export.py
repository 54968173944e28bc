"""Export a checkpoint to diffusers' ``save_pretrained`` layout, so the ecosystem can use it.

``OUT/unet/`` holds a ``UNet2DModel`` (``config.json`` and ``diffusion_pytorch_model.safetensors``),
``OUT/scheduler/`` a ``DDIMScheduler`` config with our schedule, prediction target, clipping and
spacing, and ``OUT/model_index.json`` makes ``DDIMPipeline.from_pretrained(OUT)`` load both. The
U-Net is the DDPM one that :mod:`ddim_cli.convert` imports; this is that renaming in reverse, and
the export checks that importing it again gives back every weight. A class-conditional model
becomes ``num_class_embeds = num_classes + 1`` (the last embedding is our null label; diffusers
adds the class embedding to the time embedding after its MLP, as we do).

A patched model (``model.patch_size`` p > 1) is a plain U-Net on the pixel-unshuffled image: its
``UNet2DModel`` takes C p^2 channels at image_size / p, and since a DDIM step is elementwise,
stepping the scheduler on unshuffled latents and shuffling the result is exact; ``OUT/README.md``
shows those lines (it has no ``model_index.json``, which would make ``DDIMPipeline`` run it on
the wrong shape). Every export is loaded back with diffusers and compared with our U-Net before
it is written (:func:`check_with_diffusers`); what diffusers cannot load is refused.
``OUT/ddim-cli.yaml`` keeps the whole config, so ``ddim convert OUT`` gives back the checkpoint's
model (patching, sampling defaults and a student's method included), not only what diffusers'
configs can say.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save

from ddim_cli.checkpoint import write_durably
from ddim_cli.config import Config
from ddim_cli.convert import (
    DIFFUSERS_PREDICTIONS,
    DIFFUSERS_SCHEDULES,
    DIFFUSERS_VERSION,
    EXPORTED_CONFIG,
    rename_diffusers,
    unet_config,
)
from ddim_cli.parameterization import BOUNDARY_SCALE
from ddim_cli.unet import UNet

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
    """Write ``weights`` (our U-Net's state dict) and ``config`` as a diffusers pipeline in ``out``.

    The export is written to a temporary folder beside ``out`` and loaded back with diffusers
    (``UNet2DModel`` and ``DDIMScheduler``), whose U-Net must give our U-Net's output on a test
    input; only then are the files moved into ``out``. What diffusers cannot load is an
    ExportError and nothing is written. Without diffusers installed the check is skipped with a
    warning."""
    _check_exportable(config)
    levels = len(config.model.ch_mult)
    state = {_diffusers_key(key, levels): _diffusers_value(key, value) for key, value in weights.items()}
    back = rename_diffusers(state, levels)
    if back.keys() != weights.keys() or any(not torch.equal(back[k], weights[k]) for k in weights):
        raise AssertionError("the diffusers renaming does not invert the import's")  # a bug, never the user's
    patched = config.model.patch_size > 1
    files = {
        Path("unet") / "config.json": _json(unet_config(config)),
        Path("unet") / "diffusion_pytorch_model.safetensors": save(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata={"format": "pt"}
        ),
        Path("scheduler") / "scheduler_config.json": _json(scheduler_config(config)),
        Path("README.md"): exported_readme(config).encode(),
        Path(EXPORTED_CONFIG): config.to_yaml().encode(),  # for `ddim convert OUT`: the model as it was
    }
    # A patched U-Net needs the unshuffle/shuffle around DDIMPipeline's loop, and no pipeline of
    # diffusers steps an LCMScheduler over a UNet2DModel: README.md shows the loop for both.
    if not patched and scheduler_class(config) == "DDIMScheduler":
        files[Path("model_index.json")] = _json(
            {
                "_class_name": "DDIMPipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "scheduler": ["diffusers", "DDIMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            }
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        staging = Path(staging)
        for relative, data in files.items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_bytes(data)
        check_with_diffusers(staging, config, weights)
        for relative, data in files.items():
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            write_durably(out / relative, data)
    return [out / relative for relative in files]


def _check_exportable(config: Config) -> None:
    """What UNet2DModel cannot express, refused in one line before anything is written."""
    m = config.model
    if m.ch_mult[0] != 1:
        widths = [m.ch * k for k in m.ch_mult]
        same = f"ch {widths[0]} and ch_mult {[w // widths[0] for w in widths]} has the same level widths and exports"
        instead = f"a model with {same}" if all(w % widths[0] == 0 for w in widths) else "only ch_mult[0] = 1 exports"
        raise ExportError(
            f"diffusers' UNet2DModel cannot hold model.ch {m.ch} with ch_mult {list(m.ch_mult)}: its conv_in outputs "
            f"block_out_channels[0] = {widths[0]} channels, ours outputs ch = {m.ch}; {instead}"
        )


def check_with_diffusers(folder: Path, config: Config, weights: dict[str, torch.Tensor]) -> None:
    """Load the export in ``folder`` with diffusers and compare its U-Net with ours on a test input
    (for a patched model, on the pixel-unshuffled input); an ExportError says what failed."""
    try:
        import diffusers
        from diffusers import UNet2DModel
    except ImportError:
        warnings.warn(
            "diffusers is not installed, so the export was not loaded back to check it "
            "(pip install 'ddim-cli[export]' adds it)",
            stacklevel=3,
        )
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # low_cpu_mem_usage needs accelerate; without it diffusers logs a paragraph saying so
            theirs = UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).eval()
            getattr(diffusers, scheduler_class(config)).from_pretrained(folder / "scheduler")
    except Exception as error:  # whatever diffusers raises: its first line says what
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"diffusers cannot load this export ({first}); nothing was written") from None
    ours = UNet(config.unet_config())
    ours.load_state_dict(weights)
    ours.eval()
    p, c, size = config.model.patch_size, config.data.channels, config.data.image_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, c * p * p, size // p, size // p, generator=generator)
    t = torch.tensor([1, config.diffusion.num_timesteps - 1])
    labels = None if config.model.num_classes is None else torch.tensor([0, config.model.num_classes])
    with torch.no_grad():
        expected = ours(F.pixel_shuffle(x, p) if p > 1 else x, t, labels)
        expected = F.pixel_unshuffle(expected, p) if p > 1 else expected
        got = theirs(x, t, class_labels=labels).sample
    error = float((got - expected).abs().max())
    if not error <= 1e-4 * (1 + float(expected.abs().max())):
        raise ExportError(f"diffusers loads this export but computes another output (max difference {error:.3g})")


def exported_readme(config: Config) -> str:
    """How to sample the export with diffusers, as ``ddim sample`` samples the checkpoint."""
    if scheduler_class(config) == "LCMScheduler":
        return _consistency_readme(config)
    m, p = config.model, config.model.patch_size
    steps = config.sample.steps
    labels = "" if m.num_classes is None else ", class_labels=labels"
    label_line = (
        ""
        if m.num_classes is None
        else f"labels = torch.tensor([3] * 4)  # classes 0..{m.num_classes - 1}; {m.num_classes} is the null label\n"
    )
    shape = f"(4, {config.data.channels}, {config.data.image_size}, {config.data.image_size})"
    noise = f"F.pixel_unshuffle(torch.randn{shape}, {p})" if p > 1 else f"torch.randn{shape}"
    result = f"F.pixel_shuffle(x, {p})" if p > 1 else "x"
    student = ""
    if config.distill is not None:
        student = (
            f"This is a {steps}-step student distilled from {config.distill.teacher} (ddim distill): sample it with "
            f"{steps} steps on the trailing grid, as the scheduler config says"
            + (
                f"; it learnt its teacher guided at w = {config.distill.guidance:g}, so no guidance is needed.\n\n"
                if m.num_classes is not None
                else ".\n\n"
            )
        )
    patched = (
        f"The model runs on {p}x{p} patches: its UNet2DModel sees the image pixel-unshuffled into "
        f"{config.data.channels * p * p} channels at {config.data.image_size // p}x{config.data.image_size // p}. "
        "A DDIM step is elementwise, so stepping the scheduler on the unshuffled latents and shuffling the result "
        "is exact; DDIMPipeline does not know to do that, so this folder has no model_index.json.\n\n"
        if p > 1
        else "`DDIMPipeline.from_pretrained(THIS_FOLDER)` loads it as a pipeline too.\n\n"
    )
    output, guided = f"unet(x, t{labels}).sample", ""
    w, phi = config.sample.guidance, config.sample.guidance_rescale
    if m.num_classes is not None and config.distill is None and w > 0:
        # As ddim_cli.guidance.classifier_free_guidance, which `ddim sample` uses by default.
        output = "guided(x, t)"
        guided = (
            f"Sampled as `ddim sample` does: classifier-free guidance w = {w:g} (`(1 + w) cond - w uncond`; "
            f"diffusers' guidance_scale is 1 + w) with guidance rescale {phi:g}, the config's sample.guidance "
            "and sample.guidance_rescale. Set w = 0 for the plain conditional model.\n\n"
        )
        label_line += (
            f"w, phi = {w:g}, {phi:g}\nnull = torch.full_like(labels, {m.num_classes})\n\n\n"
            "def guided(x, t):\n"
            "    both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample\n"
            "    cond, uncond = both.chunk(2)\n"
            "    g = (1 + w) * cond - w * uncond\n"
            "    dims = tuple(range(1, g.dim()))\n"
            "    return phi * g * cond.std(dims, keepdim=True) / g.std(dims, keepdim=True) + (1 - phi) * g\n\n\n"
        )
    return (
        "# Exported by ddim-cli (`ddim export`)\n\n" + student + patched + guided + "```python\n"
        "import torch\nimport torch.nn.functional as F\nfrom diffusers import DDIMScheduler, UNet2DModel\n\n"
        'unet = UNet2DModel.from_pretrained("THIS_FOLDER", subfolder="unet")\n'
        'scheduler = DDIMScheduler.from_pretrained("THIS_FOLDER", subfolder="scheduler")\n'
        f"scheduler.set_timesteps({steps})\n" + label_line + f"x = {noise}  # x_T\n"
        "with torch.no_grad():\n    for t in scheduler.timesteps:\n"
        f"        x = scheduler.step({output}, t, x, eta=0.0).prev_sample\n"
        f"images = {result}  # in [-1, 1]\n```\n"
    )


def _consistency_readme(config: Config) -> str:
    """The sampling loop of a consistency or DMD student: LCMScheduler's steps, each image's noise
    (its x_T, its class, then what each step re-noises with) drawn from its own generator seeded
    ``seed + i`` as ``ddim sample`` draws it, so that the images are ``ddim sample``'s."""
    m, p, x = config.model, config.model.patch_size, config.distill
    served = ", ".join(map(str, _served_counts(config)))
    c, size = config.data.channels, config.data.image_size
    labels = ""
    if m.num_classes is not None:
        labels = (
            f"labels = torch.cat([torch.randint({m.num_classes}, (1,), generator=g) for g in generators])  "
            "# drawn as ddim sample draws them (always, even with --class)\n"
            f"# labels = torch.tensor([3] * 4)  # --class 3; {m.num_classes} is the null label (--unconditional)\n"
        )
    network_input = f"F.pixel_unshuffle(x, {p})" if p > 1 else "x"
    call = f"unet({network_input}, t{', class_labels=labels' if labels else ''}).sample"
    if p > 1:
        call = f"F.pixel_shuffle({call}, {p})"
    guided = f"; it learnt its teacher guided at w = {x.guidance:g}, so no guidance is needed" if labels else ""
    patched = (
        f" The U-Net runs on {p}x{p} patches: it sees the image pixel-unshuffled into {c * p * p} channels at "
        f"{size // p}x{size // p}, and its output is shuffled back, so the scheduler steps (and draws its noise) "
        "in pixel space, as ddim sample does."
        if p > 1
        else ""
    )
    return (
        "# Exported by ddim-cli (`ddim export`)\n\n"
        f"This is a {x.method} student distilled from {x.teacher} (ddim distill){guided}. It samples with "
        f"LCMScheduler's multistep consistency chain in {served} steps ({x.steps} as trained): each step predicts "
        "the image and, before the next, re-noises it with fresh noise. No diffusers pipeline steps an LCMScheduler "
        f"over a UNet2DModel, so this folder has no model_index.json; the loop is below.{patched}\n\n"
        "```python\nimport torch\nimport torch.nn.functional as F\nfrom diffusers import LCMScheduler, UNet2DModel\n\n"
        'unet = UNet2DModel.from_pretrained("THIS_FOLDER", subfolder="unet")\n'
        'scheduler = LCMScheduler.from_pretrained("THIS_FOLDER", subfolder="scheduler")\n'
        f"scheduler.set_timesteps({x.steps})\n"
        "generators = [torch.Generator().manual_seed(seed) for seed in range(4)]  # ddim sample --seed 0 --n 4\n"
        f"x = torch.stack([torch.randn({c}, {size}, {size}, generator=g) for g in generators])  # x_T\n"
        + labels
        + "with torch.no_grad():\n    for t in scheduler.timesteps:\n"
        f"        x = scheduler.step({call}, t, x, generator=generators).prev_sample\n"
        "images = x  # in [-1, 1]\n```\n"
    )


def _served_counts(config: Config) -> list[int]:
    from ddim_cli.distillation.consistency import consistency_times

    served = []
    for count in range(1, config.distill.grid_size + 1):
        try:
            consistency_times(config.diffusion.num_timesteps, config.distill.grid_size, count)
        except ValueError:
            continue
        served.append(count)
    return served


def scheduler_class(config: Config) -> str:
    """``DDIMScheduler``, or for a consistency or DMD student ``LCMScheduler``, which steps the
    multistep consistency chain (CM Algorithm 1) with our boundary scalings (``timestep_scaling``)."""
    return "LCMScheduler" if config.distill is not None and config.distill.sampler == "consistency" else "DDIMScheduler"


def scheduler_config(config: Config) -> dict[str, Any]:
    """A ``DDIMScheduler`` config giving our schedule (named where diffusers has the same formula,
    else as ``trained_betas``), prediction target, clipping and default spacing; the last step goes
    to ``alpha_bar = 1`` as ours does (``set_alpha_to_one``). For a consistency or DMD student, an
    ``LCMScheduler`` config whose ``set_timesteps(N)`` gives the student's ``lcm`` grid
    (``original_inference_steps = T``) and whose ``c_skip``/``c_out`` are ours (``timestep_scaling``
    = :data:`~ddim_cli.parameterization.BOUNDARY_SCALE`)."""
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
    if scheduler_class(config) == "LCMScheduler":
        for key in ("steps_offset", "timestep_spacing"):
            del scheduler[key]
        scheduler |= {
            "_class_name": "LCMScheduler",
            "original_inference_steps": d.num_timesteps,
            "timestep_scaling": BOUNDARY_SCALE,
            "dynamic_thresholding_ratio": 0.995,
            "sample_max_value": 1.0,
        }
    if d.schedule not in named:
        betas = 1 - config.alpha_bars() / torch.cat([torch.ones(1, dtype=torch.float64), config.alpha_bars()[:-1]])
        scheduler |= {"beta_schedule": "linear", "trained_betas": betas.tolist(), "rescale_betas_zero_snr": False}
    if sample.skip not in _SPACINGS and scheduler_class(config) == "DDIMScheduler":
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
