import pytest
from typer.testing import CliRunner

from ddim_cli import __version__
from ddim_cli.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"ddim-cli {__version__}"


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ["train", "sample", "invert", "compare"]:
        assert command in result.output


@pytest.mark.parametrize("command", ["sample", "invert", "compare"])
def test_unfinished_commands_exit_non_zero_saying_so(command):
    result = runner.invoke(app, [command, "configs/digits.yaml"])
    assert result.exit_code == 1
    assert "not implemented" in result.output
