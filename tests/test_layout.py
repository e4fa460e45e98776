"""The package's layout is its architecture: imports run one way, read from every module's source (ast).

Layers, lowest first: ``errors`` / ``version``, ``settings`` / ``atomic``, ``core`` (the method), ``models``, ``data``,
``run``, ``train``, ``api``, ``cli``. A module imports only its own layer's modules and lower ones (function-level
imports included); ``core`` imports nothing of gaqprune but ``errors`` and ``settings``; nothing but the entry points
imports ``cli``; the shipped remote code imports nothing of gaqprune; and no modules import each other in a circle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gaqprune"
RANK = {"errors": 0, "version": 0, "settings": 1, "atomic": 1, "core": 2, "models": 3, "data": 4, "run": 5, "train": 6,
        "api": 7, "cli": 8}


def modules() -> dict[str, Path]:
    return {".".join(f.with_suffix("").relative_to(PACKAGE.parent).parts).removesuffix(".__init__"): f
            for f in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The gaqprune modules a file imports anywhere in it (``from gaqprune.core import units`` is
    ``gaqprune.core.units``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "gaqprune"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "gaqprune":
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__root__"


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports(path, known) for name, path in modules().items()}


def test_imports_run_one_way():
    wrong = []
    for module, deps in graph().items():
        if layer(module) == "__root__" or module.startswith("gaqprune.cli"):  # the facade and the entry points
            continue
        for dep in deps:
            if layer(dep) == "__root__" or RANK[layer(dep)] > RANK[layer(module)] or (
                    RANK[layer(dep)] == RANK[layer(module)] and layer(dep) != layer(module)):
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


def test_core_imports_only_errors_and_settings():
    outside = {f"{m} -> {d}" for m, deps in graph().items() if layer(m) == "core" for d in deps
               if layer(d) not in ("core", "errors", "settings")}
    assert outside == set()


def test_only_the_entry_points_import_the_command_line():
    users = {m for m, deps in graph().items() if any(layer(d) == "cli" for d in deps) and layer(m) != "cli"}
    assert users == set()
    toml = (PACKAGE.parent / "pyproject.toml").read_text()
    assert re.search(r'gaqprune = "gaqprune\.cli:main"', toml) and (PACKAGE / "cli" / "__main__.py").is_file()


def test_the_shipped_remote_code_imports_nothing_of_gaqprune():
    code = {m: deps for m, deps in graph().items() if ".remote_code." in m}
    assert len(code) == 2 and all(deps == set() for deps in code.values())


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if dep not in edges or dep == node:
                continue
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    # the package's own __init__ files re-export nothing, so a package and its modules form no circle either
    assert circles == []


def test_no_test_module_imports_another():
    tests = Path(__file__).resolve().parent
    names = {f.stem for f in tests.glob("test_*.py")} | {"conftest"}
    found = {f"{f.name} -> {dep}" for f in tests.glob("*.py") for dep in imports_of(f) if dep.split(".")[-1] in names
             or dep.startswith("tests.")}
    assert found == set()


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_the_readme_layout_table_is_the_folder_listing():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(gaqprune/[\w/]+(?:\.py)?/?)`", table))
    on_disk = {str(f.relative_to(PACKAGE.parent)) for f in PACKAGE.rglob("*.py") if f.name != "__init__.py"
               and "remote_code" not in f.parts and f.name != "__main__.py"}
    on_disk |= {"gaqprune/models/remote_code/"}
    assert listed == on_disk
