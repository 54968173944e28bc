"""`torchrun -m ddim_cli -- sample ...`: two gloo ranks write the very files one process writes."""

import socket
import subprocess
import sys

import numpy as np
import pytest
from test_commands import make_run, ok


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("conditional", [False, True])
def test_two_ranks_write_byte_identical_outputs(tmp_path, conditional):
    run = make_run(tmp_path / "run", **({"num_classes": 10} if conditional else {}))
    # 7 images in batches of 3: uneven batches, and a last batch that one rank has nothing of.
    common = ["--n", "7", "--batch-size", "3", "--seed", "2", "--steps", "3", "--eta", "1"]
    if conditional:
        common += ["--class", "3,1,4"]

    def outputs(name):
        return [
            "--out",
            str(tmp_path / f"{name}.png"),
            "--out-dir",
            str(tmp_path / name),
            "--npz",
            str(tmp_path / f"{name}.npz"),
            "--save-latents",
            str(tmp_path / f"{name}.npy"),
        ]

    ok("sample", run, *common, *outputs("one"))
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
    # As README shows it: torchrun's own options, then -m ddim_cli -- and the command.
    two = subprocess.run(
        [
            *launcher,
            "-m",
            "ddim_cli",
            "--",
            "sample",
            str(run),
            *common,
            *outputs("two"),
            "--no-progress",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("7 images with") == 1  # rank 0 alone reports (and writes)
    for name in ("png", "npz", "npy"):
        assert (tmp_path / f"one.{name}").read_bytes() == (tmp_path / f"two.{name}").read_bytes(), name
    pngs = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert pngs == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(pngs) == 7
    for png in pngs:
        assert (tmp_path / "one" / png).read_bytes() == (tmp_path / "two" / png).read_bytes()
    assert np.load(tmp_path / "two.npz")["arr_0"].shape == (7, 8, 8, 1)
