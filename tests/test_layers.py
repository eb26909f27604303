"""The package's import graph follows its layers: data flows one way, no module reaches into another's privates.

Every import counts, including those inside functions (a lazy import is still a dependency). A module may
import modules of its own layer or below; CONTRIBUTING.md draws the same layers.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "chatvec_lab"

LAYERS = [
    # 0: facts and parsing, no model logic
    {"errors", "version", "naming", "kernels", "formats", "transforms", "threads", "intervals"},
    # 1: bytes to memory, vocabularies, writing outputs, finding the shipped data
    {"paging", "vocab", "output", "resources"},
    # 2: where weights come from
    {"sources"},
    # 3: the chat vector itself, then the plan of how vectors meet a target
    {"vector"},
    {"plan"},
    # 4: using a vector: apply (files / models), live coefficients, geometry, info
    {"apply", "info", "geometry", "merge", "lora", "interference"},
    {"live"},
    # 5: generation and its measures
    {"generation", "scoring"},
    {"engines"},
    {"grid"},
    {"sweep", "atlas", "ablations"},
    # 6: pictures and widgets of what the layers below compute
    {"plots"},
    {"widgets", "exercises", "_solutions"},
    # 7: the toy family and its evaluation
    {"toy", "toy.corpora", "toy.dialogues", "toy.train"},
    {"toy.evaluate"},
    {"toy.families"},
    # 8: entry points (the demo's report, then the demo)
    {"report"},
    {"demo"},
    {"cli"},
    {""},  # the package root re-exports the API
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


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
    missing = sorted(set(_graph()) - set(RANK))
    assert not missing, f"modules without a layer in tests/test_layers.py: {missing}"


def test_imports_go_down_the_layers_only():
    upward = [f"{m} → {dep or 'chatvec_lab'}" for m, deps in _graph().items() for dep, _ in deps
              if RANK.get(dep, -1) > RANK[m]]
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
