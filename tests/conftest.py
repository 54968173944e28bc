"""Tiny trained runs shared by the command tests (one per test module, as module-scoped fixtures).

The suite runs in two pytest-xdist workers (pyproject's addopts): each runs one CPU thread, and so do
the processes its tests start (they inherit OMP_NUM_THREADS), so that two workers on two cores never
wait on each other's threads. tests/test_threads.py sets and clears the variable where it matters."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads

import pytest  # noqa: E402
from test_commands import make_run  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """An unconditional tiny run (test_commands.TINY)."""
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """The tiny run, class-conditional with 10 classes."""
    return make_run(tmp_path_factory.mktemp("runs") / "cond", num_classes=10)
