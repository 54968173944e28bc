"""The package's imports point one way: commands above jobs, jobs above the loaded model, that above
the algorithms, and those above the schedule and the network; no module imports itself back."""

import ast
from pathlib import Path

import ddim_cli

PACKAGE = Path(ddim_cli.__file__).parent
ALGORITHMS = {"sampling", "null_text", "editing", "restoration", "guidance", "distillation", "parameterization"}
FOUNDATION = {"schedule", "unet"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imports_of(path: Path) -> set[str]:
    """The ddim_cli modules ``path`` imports anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddim_cli"):
            base = node.module.removeprefix("ddim_cli").lstrip(".")
            for alias in node.names:  # `from ddim_cli import distributed` names a module
                candidate = f"{base}.{alias.name}".lstrip(".")
                found.add(candidate if candidate in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("ddim_cli.") for a in node.names if a.name.startswith("ddim_cli.")}
    return found - {""}


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")} - {""}
GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py") if module_name(p)}


def layer(module: str) -> int:
    if module in {"cli", "__main__"} or module.startswith("commands"):
        return 4
    if module.startswith("jobs") or module in {"train", "compare", "fid", "convert", "export"}:
        return 3
    if module in {"models", "batches"}:
        return 2
    if module in ALGORITHMS:
        return 1
    if module in FOUNDATION:
        return 0
    return -1  # helpers (config, images, checkpoint, seeding, ...): checked for cycles only


def test_imports_never_point_up_the_layers():
    upward = [f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps if layer(m) >= 0 and layer(d) > layer(m)]
    assert not upward


def test_no_command_module_imports_another_command():
    commands = {m for m in GRAPH if m.startswith("commands.") and m not in COMMAND_HELPERS}
    assert commands >= {"commands.sample", "commands.invert", "commands.edit", "commands.restore"}
    assert not [f"{m} imports {d}" for m in commands for d in GRAPH[m] if d in commands]


def test_the_import_graph_has_no_cycles():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 2:
            return
        assert state.get(module) != 1, "import cycle: " + " -> ".join(path + [module])
        state[module] = 1
        for dependency in GRAPH.get(module, ()):
            visit(dependency, path + [module])
        state[module] = 2

    for module in GRAPH:
        visit(module, [])


COMMAND_HELPERS = {"commands.options", "commands.errors", "commands.running", "commands.progress"}


def command_bodies() -> dict[str, int]:
    """Lines of each command function's body (after its docstring), by command module."""
    lengths = {}
    for path in sorted((PACKAGE / "commands").glob("*.py")):
        name = module_name(path)
        if name in COMMAND_HELPERS or path.stem == "__init__":
            continue
        tree = ast.parse(path.read_text())
        [function] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
        body = function.body[1:] if ast.get_docstring(function) else function.body
        lengths[name] = function.end_lineno - body[0].lineno + 1
    return lengths


def test_every_command_body_is_short():
    # A command parses, calls the library and prints; what it would assemble itself belongs there.
    lengths = command_bodies()
    assert set(lengths) >= {"commands.sample", "commands.compare", "commands.train", "commands.distill"}
    assert {name: n for name, n in lengths.items() if n > 60} == {}
