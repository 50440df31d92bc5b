"""The layers of the code (pyproject.toml, [tool.bao.layers]): imports go downwards only.

Every module of the repository is parsed (not imported) and each of its imports of our own
packages is checked against the table: a module may import its own package and the packages
of lower layers. The test fails on the first import that runs back up or sideways.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT

LAYERS: dict[str, list[str]] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["bao"]["layers"]
LEVEL = {package: level for level, packages in enumerate(LAYERS.values()) for package in packages}


def _modules() -> list[Path]:
    files = [p for package in LEVEL for p in sorted((ROOT / package).rglob("*.py"))]
    files += [ROOT / f"{m}.py" for m in LEVEL if (ROOT / f"{m}.py").is_file()]
    return files


def _our_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name) of every import of one of our packages in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in LEVEL]
    return found


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_the_table_covers_every_package_and_entry_script():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"}
    scripts = {p.stem for p in ROOT.glob("*.py")}
    assert packages | scripts == set(LEVEL), "add new packages and scripts to [tool.bao.layers] in pyproject.toml"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_downwards_only(path):
    own = _package(path)
    for line, name in _our_imports(path):
        if name == own:
            continue
        assert LEVEL[name] < LEVEL[own], (
            f"{path.relative_to(ROOT)}:{line} imports {name} (layer {LEVEL[name]}) from layer {LEVEL[own]} ({own}); "
            "a module may import only its own package and lower layers")


def test_the_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom tool.cam import normalize_maps\nimport data.layout as layout\n")
    assert _our_imports(bad) == [(2, "tool"), (3, "data")]
    assert LEVEL["tool"] > LEVEL["data"] > LEVEL["core"]
    assert LEVEL["data"] == LEVEL["network"]  # neither may import the other


def test_the_commands_on_top_sit_above_the_entry_scripts_they_run():
    """protocol/ runs the entry scripts and parses their command lines with their own parsers: it may
    import them, and they (and everything below them) may not import it; bench/ times the runner."""
    scripts = ("train_bao", "infer_bao", "evaluation_bao", "visual_bao", "train_seg", "infer_seg")
    assert all(LEVEL["apps"] < LEVEL[s] < LEVEL["protocol"] for s in scripts)
    assert LEVEL["protocol"] < LEVEL["bench"]
    imports = {name for path in sorted((ROOT / "protocol").rglob("*.py")) for _, name in _our_imports(path)}
    assert set(scripts) <= imports  # the runner's check of every stage's command line


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, at any depth of the file (function-level imports too).

    ``from package import name`` counts as an import of ``package.name`` when that is a module.
    """
    modules = {_module_name(p): p for p in _modules()}
    modules.update({_module_name(p): p for p in ROOT.glob("*/__init__.py") if p.parent.name in LEVEL})
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_circle_between_modules():
    """Not even inside a package, and not through an import deferred into a function."""
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


# The size rule (docs/architecture.md): a library module over 450 lines holds two things, an entry
# script over 300 holds library code; the two training scripts were asked to stay smaller still.
LIBRARY_LIMIT, SCRIPT_LIMIT = 450, 300
SCRIPT_LIMITS = {"train_bao": 250, "train_seg": 180}


def test_no_module_is_too_long():
    too_long = []
    for path in _modules():
        lines = len(path.read_text().splitlines())
        if path.parent == ROOT:
            limit = SCRIPT_LIMITS.get(path.stem, SCRIPT_LIMIT)
        else:
            limit = LIBRARY_LIMIT
        if lines > limit:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines (at most {limit})")
    assert not too_long, "; ".join(too_long)
