"""ddim-cli: train denoising diffusion models and sample them with DDPM and DDIM.

The library API the ``ddim`` command is built on: the algorithms over any ``eps_model(x, t)``::

    from ddim_cli import UNet, UNetConfig, alpha_bars, timesteps, sample, invert, restore

and the jobs the commands run on a trained checkpoint::

    from ddim_cli import load_model, noise_model, generate, invert_images, edit_images, restore_images

each with a ``*_to_folder`` / ``write_*`` companion in :mod:`ddim_cli.jobs` that writes what its
command writes.
"""

from ddim_cli.guidance import classifier_free_guidance
from ddim_cli.jobs.edit import edit_images
from ddim_cli.jobs.invert import invert_images, invert_null_text
from ddim_cli.jobs.restore import restore_images
from ddim_cli.jobs.sample import generate
from ddim_cli.models import SamplerSpec, load_model, noise_model
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
