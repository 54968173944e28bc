"""``python -m ddim_cli`` runs the ``ddim`` command (handy under ``torchrun -m``)."""

from ddim_cli.cli import main

main()
