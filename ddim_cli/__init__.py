"""ddim-cli: train denoising diffusion models and sample them with DDPM and DDIM.

The library API the ``ddim`` command is built on: the algorithms over any ``eps_model(x, t)``::

    from ddim_cli import UNet, UNetConfig, alpha_bars, timesteps, sample, invert, restore

and the jobs the commands run on a trained checkpoint::

    from ddim_cli import load_model, noise_model, generate, invert_images, edit_images, restore_images

each with a ``*_to_folder`` / ``write_*`` companion in :mod:`ddim_cli.jobs` that writes what its
command writes.
"""

from importlib import import_module

__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use (PEP 562), so that
# ``import ddim_cli`` and the ``ddim`` command's --help do not load torch.
_PUBLIC = {
    "SamplerSpec": "ddim_cli.models",
    "UNet": "ddim_cli.unet",
    "UNetConfig": "ddim_cli.unet",
    "alpha_bars": "ddim_cli.schedule",
    "betas": "ddim_cli.schedule",
    "classifier_free_guidance": "ddim_cli.guidance",
    "edit_images": "ddim_cli.jobs.edit",
    "generate": "ddim_cli.jobs.sample",
    "invert": "ddim_cli.sampling",
    "invert_images": "ddim_cli.jobs.invert",
    "invert_null_text": "ddim_cli.jobs.invert",
    "load_model": "ddim_cli.models",
    "noise_model": "ddim_cli.models",
    "restore": "ddim_cli.restoration",
    "restore_images": "ddim_cli.jobs.restore",
    "sample": "ddim_cli.sampling",
    "timesteps": "ddim_cli.schedule",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ddim_cli' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__all__ = [
    "SamplerSpec",
    "UNet",
    "UNetConfig",
    "alpha_bars",
    "betas",
    "classifier_free_guidance",
    "edit_images",
    "generate",
    "invert",
    "invert_images",
    "invert_null_text",
    "load_model",
    "noise_model",
    "restore",
    "restore_images",
    "sample",
    "timesteps",
    "__version__",
]
