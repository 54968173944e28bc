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


@pytest.mark.parametrize("args", [["sample", "--help"], ["train", "configs/digits.yaml", "--dry-run"]])
def test_a_closed_pipe_ends_the_command_quietly(args):
    # `ddim sample --help | head`: the reader is gone before the command writes; as with other Unix tools,
    # SIGPIPE ends it, with nothing on stderr.
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "ddim_cli", *args]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait() == -signal.SIGPIPE
    assert stderr == ""


def test_help_shows_no_value_for_flags_and_groups_the_options():
    result = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    for panel in ("Sampler", "Classes and guidance", "Outputs", "Hardware and speed"):
        assert f" {panel} " in result.output
    assert "<bool>" not in runner.invoke(app, ["--help"]).output


def test_the_jobs_a_python_user_needs_import_from_the_package():
    import ddim_cli

    jobs = {
        "load_model",
        "noise_model",
        "generate",
        "invert_images",
        "invert_null_text",
        "edit_images",
        "restore_images",
    }
    assert jobs | {"sample", "invert", "restore"} <= set(ddim_cli.__all__)
    assert all(callable(getattr(ddim_cli, name)) for name in ddim_cli.__all__ if name != "__version__")
    # No export may hide a submodule: `import ddim_cli.X` and `ddim_cli.X` must be the same thing.
    import pkgutil

    modules = {info.name for info in pkgutil.iter_modules(ddim_cli.__path__)}
    assert not modules & set(ddim_cli.__all__)


def test_help_version_and_usage_errors_do_not_load_torch():
    # `ddim --help` must answer at once: torch takes seconds to import. A fresh interpreter builds the
    # app, renders every command's help, the version and a usage error, then reports what it loaded.
    import subprocess
    import sys

    script = """
import sys
from typer.testing import CliRunner
import ddim_cli
from ddim_cli.cli import app
from typer.main import get_command
runner = CliRunner()
names = list(get_command(app).commands)
assert len(names) >= 10, names
for args in [["--help"], ["--version"], ["sample", "--bogus-option"], *[[name, "--help"] for name in names]]:
    result = runner.invoke(app, args)
    assert result.exit_code == (2 if "--bogus-option" in args else 0), (args, result.output)
print(sorted(m for m in ("torch", "numpy", "PIL", "safetensors") if m in sys.modules))
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_sampling_and_training_do_not_import_torchvision():
    # Importing torchvision loads torch._dynamo: about 1 s of a small command's 2 s. Only the
    # datasets and image transforms that need it import it, when they are used.
    import subprocess
    import sys

    script = """
import sys
import ddim_cli.cli, ddim_cli.jobs.sample, ddim_cli.jobs.invert, ddim_cli.train, ddim_cli.images, ddim_cli.monitor
print(sorted(m for m in ("torchvision", "torch._dynamo") if m in sys.modules))
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("count, nrow", [(1, 8), (2, 1), (5, 2), (7, 3), (16, 4), (3, 8)])
def test_image_grid_lays_images_out_as_torchvision_make_grid(count, nrow, channels):
    import torch
    from torchvision.utils import make_grid

    from ddim_cli.images import image_grid

    images = torch.rand(count, channels, 5, 6, generator=torch.Generator().manual_seed(count)) * 2 - 1
    assert torch.equal(image_grid(images, nrow), make_grid(images, nrow=nrow, padding=2, pad_value=-1.0))


def test_no_help_text_holds_what_markdown_help_would_drop():
    # The app renders help as Markdown, which drops anything shaped like an HTML tag: distill's
    # "runs/<teacher>-<method>-S<steps>" once showed as "runs/--S".
    import re

    import typer

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        texts = [command.help or ""] + [getattr(param, "help", None) or "" for param in command.params]
        for text in texts:
            assert not re.search(r"<[A-Za-z/][^>]*>", text), f"ddim {name}: {text}"
    rendered = runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "200"}).output
    assert "runs/TEACHER-METHOD-SSTEPS" in rendered
