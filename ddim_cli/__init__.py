"""ddim-cli: train denoising diffusion models and sample them with DDPM and DDIM.

The library API the ``ddim`` command is built on: the algorithms over any ``eps_model(x, t)``::

    from ddim_cli import UNet, UNetConfig, alpha_bars, timesteps, sample, invert, restore

and the jobs the commands run on a trained checkpoint::

    from ddim_cli import load_model, noise_model, invert_images, edit_images, restore_images

(sampling is ``ddim_cli.generate.generate``: exported here, the function would hide its module.)
"""

from ddim_cli.generate import (
    SamplerSpec,
    edit_images,
    invert_images,
    invert_null_text,
    load_model,
    noise_model,
    restore_images,
)
from ddim_cli.guidance import classifier_free_guidance
from ddim_cli.restoration import restore
from ddim_cli.sampling import invert, sample
from ddim_cli.schedule import alpha_bars, betas, timesteps
from ddim_cli.unet import UNet, UNetConfig

__version__ = "0.1.0"

__all__ = [
    "SamplerSpec",
    "UNet",
    "UNetConfig",
    "alpha_bars",
    "betas",
    "classifier_free_guidance",
    "edit_images",
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
