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
