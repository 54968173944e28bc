"""ddim-cli: train denoising diffusion models and sample them with DDPM and DDIM.

The library API the ``ddim`` command is built on::

    from ddim_cli import UNet, UNetConfig, alpha_bars, timesteps, sample, invert, restore
"""

from ddim_cli.guidance import classifier_free_guidance
from ddim_cli.restoration import restore
from ddim_cli.sampling import invert, sample
from ddim_cli.schedule import alpha_bars, betas, timesteps
from ddim_cli.unet import UNet, UNetConfig

__version__ = "0.1.0"

__all__ = [
    "UNet",
    "UNetConfig",
    "alpha_bars",
    "betas",
    "classifier_free_guidance",
    "invert",
    "restore",
    "sample",
    "timesteps",
    "__version__",
]
