"""`ddim` with test_fid's small feature extractor in place of Inception, for commands that the tests
run in other processes (torchrun): `python tests/small_fid_ddim.py compare ...`."""

import sys

from test_fid import small_extractor

import ddim_cli.fid as fid
from ddim_cli.cli import main

fid.inception_extractor = lambda weights=None, device="cpu": small_extractor

if __name__ == "__main__":
    sys.argv[0] = "ddim"
    main()
