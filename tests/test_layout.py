"""The shape of the house: one room per concept, imports one way, no cycles, no Qt below the GUI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("native", "converters", "qdesk")
LAYERS = ("native", "converters", "qdesk", "qdesk.gui")
"""Each layer may import the ones before it, never the ones after it."""
TOP_LEVEL_MODULES = {"qdesk.cli", "qdesk.__main__", "qdesk"}
"""The entry points: they sit at the top of qdesk/ and may start the desktop app."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """First-party modules `path` imports; with `top_level_only`, only those imported when it is loaded."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _layer(module: str) -> int:
    return max(index for index, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + "."))


def test_every_qdesk_module_sits_in_a_package_that_names_its_concept() -> None:
    loose = sorted(name for name, path in _modules().items()
                   if name.startswith("qdesk.") and path.parent == ROOT / "qdesk" and name not in TOP_LEVEL_MODULES)
    assert loose == []


def test_imports_go_one_way() -> None:
    modules = _modules()
    upward = sorted(f"{name} imports {imported}" for name, path in modules.items() if name not in TOP_LEVEL_MODULES
                    for imported in _imports(path, top_level_only=False)
                    if _layer(imported) > _layer(name))
    assert upward == []


def test_nothing_below_the_gui_imports_qt() -> None:
    offenders = []
    for name, path in _modules().items():
        if _layer(name) == LAYERS.index("qdesk.gui"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {imported}" for imported in names if imported.startswith("PySide6")]
    assert offenders == []


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph = {name: {imported for imported in _imports(path, top_level_only=True) if imported in modules} - {name}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(name: str, trail: list[str]) -> bool:
        state[name] = 1
        for imported in sorted(graph[name]):
            if state.get(imported) == 1:
                cycle.extend([*trail[trail.index(imported):], imported] if imported in trail else [name, imported])
                return True
            if imported not in state and visit(imported, [*trail, imported]):
                return True
        state[name] = 2
        return False

    for name in sorted(graph):
        if name not in state and visit(name, [name]):
            break
    assert cycle == []


@pytest.mark.parametrize("module", ["converters.quantization.plan", "converters.mix.report"])
def test_the_plan_and_its_report_do_not_import_each_other_back(module: str) -> None:
    other = {"converters.quantization.plan": "converters.mix.report",
             "converters.mix.report": "converters.quantization.plan"}[module]
    imports_other = other in _imports(_modules()[module], top_level_only=False)
    assert not (imports_other and module in _imports(_modules()[other], top_level_only=False))


def test_the_gui_starts_background_work_only_through_the_context() -> None:
    """`AppContext.run` is the one entry point, so closing the window can cancel every job."""
    allowed = {"qdesk.gui.background", "qdesk.gui.context"}
    starters = {"start_job", "QThreadPool", "QRunnable", "QThread", "Thread"}
    offenders = []
    for name, path in _modules().items():
        if _layer(name) != LAYERS.index("qdesk.gui") or name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            used = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if used in starters:
                offenders.append(f"{name} uses {used}")
    assert offenders == []
