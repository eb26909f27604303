"""The package's import graph follows its layers: data flows one way, no module reaches into another's privates.

Every import counts, including those inside functions (a lazy import is still a dependency). A module may
import modules of its own layer or below; CONTRIBUTING.md draws the same layers.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "chatvec_lab"

# The layers are the package's folders, bottom to top. A module may import its own folder or a lower one.
FOLDERS = [
    "",           # errors, version: facts every layer needs
    "io",         # bytes in and out: formats, tensor names, paging, vocabularies, outputs, shipped data, sources
    "core",       # the chat vector, plans, apply (files and live models), merges, low-rank export
    "analysis",   # geometry against chance, interference, intervals, info
    "behaviour",  # generation, scorers, the grid and its cache, sweeps, atlas, ablations
    "plots",      # pictures of what analysis and behaviour compute
    "toy",        # the embedded toy family, its training and evaluation
    "course",     # exercises, widgets, the demo's report, the demo
    "cli",        # parsing and dispatch
]
TOP_LEVEL = {"errors", "version", "_moved"}
MAX_TOP_LEVEL_MODULES = 10
MAX_LINES = 450


def rank(module: str) -> int:
    if module == "":
        return len(FOLDERS)  # the package root re-exports the API
    folder = module.split(".")[0]
    if folder in TOP_LEVEL:
        return 0
    return FOLDERS.index(folder) if folder in FOLDERS else -1


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(imported module, names) for every import of chatvec_lab in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "chatvec_lab":
            module = node.module[len("chatvec_lab."):] if node.module != "chatvec_lab" else ""
            for alias in node.names:
                sub = f"{module}.{alias.name}".lstrip(".")
                if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").is_file() or (PACKAGE / sub.replace(".", "/")).is_dir():
                    yield sub, []  # `from chatvec_lab import geometry`: the submodule itself
                else:
                    yield module, [alias.name]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "chatvec_lab":
                    yield alias.name[len("chatvec_lab."):] if alias.name != "chatvec_lab" else "", []


def _graph() -> dict[str, list[tuple[str, list[str]]]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_name(path)] = [(m, names) for m, names in _imports(path) if m != _module_name(path)]
    return graph


def test_every_module_has_a_layer():
    missing = sorted(m for m in _graph() if rank(m) < 0)
    assert not missing, f"modules outside the layer folders (tests/test_layers.py FOLDERS): {missing}"


def test_top_level_is_small():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= MAX_TOP_LEVEL_MODULES and set(top) <= TOP_LEVEL, top
    assert set(folders) <= set(FOLDERS) | {"data", "notebooks"}, folders


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_imports_go_down_the_layers_only():
    upward = [f"{m} → {dep or 'chatvec_lab'}" for m, deps in _graph().items() for dep, _ in deps
              if rank(dep) > rank(m)]
    assert not upward, "upward imports: " + ", ".join(upward)


def test_no_import_cycles():
    graph = {m: {d for d, _ in deps} for m, deps in _graph().items()}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_no_private_names_cross_modules():
    private = [f"{m} imports {dep}.{name}" for m, deps in _graph().items() for dep, names in deps for name in names
               if name.startswith("_") and name != "__version__"]
    assert not private, "private names used across modules: " + ", ".join(private)


def test_each_module_says_its_job():
    silent = [m for m in _graph() if not ast.get_docstring(ast.parse(
        (PACKAGE / (m.replace(".", "/") or "__init__")).with_suffix(".py").read_text()
        if (PACKAGE / (m.replace(".", "/") or "__init__")).with_suffix(".py").is_file()
        else (PACKAGE / m.replace(".", "/") / "__init__.py").read_text()))]
    assert not silent, f"modules without a docstring: {silent}"
