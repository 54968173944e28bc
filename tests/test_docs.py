"""Docs that cannot drift: every relative link and image resolves, and every `ddim ...` command in a
bash block of README.md, BENCHMARKS.md and docs/*.md parses against the real CLI (typer's click builds
the command's context from its arguments without running it: an unknown option, a missing argument or a
bad choice fails)."""

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.exceptions import TyperException

from ddim_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+://|#|mailto:", t)]


def ddim_commands(page: Path) -> list[list[str]]:
    """The argument lists of every ddim command in the page's bash blocks (continuations joined,
    comments dropped, pipes and && cut; `exec ddim ARGS` and `[srun] torchrun ... -m ddim_cli [--] ARGS`
    count as ddim ARGS)."""
    commands = []
    for block in BASH_BLOCK.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            # A shell variable ($S in a loop) stands for a value: any number parses where one is wanted.
            words = [re.sub(r"\$\{?\w+\}?", "1", w) for w in shlex.split(line, comments=True)]
            for cut in ("|", "&&", ";", ">", "2>&1"):
                words = words[: words.index(cut)] if cut in words else words
            words = words[1:] if words[:1] == ["exec"] else words
            if words[:1] == ["ddim"]:
                commands.append(words[1:])
            elif "torchrun" in words[:2] and "ddim_cli" in words:  # srun torchrun ... too
                rest = words[words.index("ddim_cli") + 1 :]
                commands.append(rest[1:] if rest[:1] == ["--"] else rest)
    return commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


ALL_COMMANDS = [(page.name, args) for page in PAGES for args in ddim_commands(page)]


def test_the_docs_show_commands_of_every_kind():
    shown = {args[0] for _, args in ALL_COMMANDS if args}
    assert {"train", "sample", "invert", "edit", "restore", "compare", "convert", "export", "fid"} <= shown


@pytest.mark.parametrize("page, args", ALL_COMMANDS, ids=[f"{p}:{' '.join(a)[:60]}" for p, a in ALL_COMMANDS])
def test_every_documented_command_parses(page, args):
    parse(args)


def parse(args: list[str]) -> None:
    group = typer.main.get_command(app)
    with typer.Context(group, info_name="ddim") as ctx:
        command = group.get_command(ctx, args[0]) if args else None
        if command is None:
            raise TyperException(f"no such command: {' '.join(args[:1])}")
        command.make_context(args[0], list(args[1:]), parent=ctx).close()


@pytest.mark.parametrize(
    "args",
    [
        ["sample", "runs/digits", "--stepz", "10"],  # an unknown option
        ["sample", "--sampler", "ddmi"],  # a bad choice
        ["restore"],  # a missing argument
        ["frobnicate"],  # an unknown command
        ["invert", "x.png", "--tol"],  # an option without its value
    ],
)
def test_the_parse_check_catches_what_would_leave_the_docs_wrong(args):
    with pytest.raises(TyperException):  # typer's vendored click.UsageError, or no such command
        parse(args)


PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PYTHON_EXAMPLES = [
    (page.name, i, code) for page in PAGES for i, code in enumerate(PYTHON_BLOCK.findall(page.read_text()))
]


def test_the_library_page_has_examples():
    assert any(page == "library.md" for page, _, _ in PYTHON_EXAMPLES)


@pytest.mark.parametrize("page, index, code", PYTHON_EXAMPLES, ids=[f"{p}:{i}" for p, i, _ in PYTHON_EXAMPLES])
def test_every_python_example_runs(page, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    exec(compile(code, f"{page} example {index}", "exec"), {"__name__": "__docs__"})
