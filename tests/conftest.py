"""Tiny trained runs shared by the command tests (one per test module, as module-scoped fixtures)."""

import pytest
from test_commands import make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """An unconditional tiny run (test_commands.TINY)."""
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """The tiny run, class-conditional with 10 classes."""
    return make_run(tmp_path_factory.mktemp("runs") / "cond", num_classes=10)
