"""The floors of the house: imports run downward only, and no module imports itself back through others.

Every import counts, also those inside functions (a lazy import is still a dependency): the floors are
`configs` (data) < `data_prep` (ground) < `detector`, `aggregation` (which never import each other) < `spinefrac`.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "data_prep", "detector", "aggregation", "spinefrac")
MAY_IMPORT: dict[str, set[str]] = {
    "configs": set(),
    "data_prep": {"configs"},
    "detector": {"configs", "data_prep"},
    "aggregation": {"configs", "data_prep"},
    "spinefrac": {"configs", "data_prep", "detector", "aggregation"},
}
"""Which other top-level packages each package may import."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """The project modules `path` imports (absolute and relative, at any depth of the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path, name):
            while imported and imported not in modules:      # `from pkg import name`: name may be an attribute
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)     # a module importing its own package's __init__ is not a circle
        graph[name] = targets
    return graph


def test_imports_run_downward_only():
    wrong = sorted(f"{src} imports {dst}" for src, dsts in _graph().items() for dst in dsts
                   if dst.split(".")[0] != src.split(".")[0]
                   and dst.split(".")[0] not in MAY_IMPORT[src.split(".")[0]])
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    try:
        tuple(TopologicalSorter(_graph()).static_order())
    except CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None


def test_the_checker_sees_circles_and_upward_imports(tmp_path, monkeypatch):
    """The two checks above could pass by seeing nothing: they must flag a planted circle and an upward import."""
    pkg = tmp_path / "data_prep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from data_prep.b import g\n")
    (pkg / "b.py").write_text("from . import a\nfrom spinefrac.cli import main\n")
    for other in PACKAGES:
        (tmp_path / other).mkdir(exist_ok=True)
    (tmp_path / "spinefrac" / "cli.py").write_text("def main():\n    pass\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = _graph()
    assert graph["data_prep.a"] == {"data_prep.b"}
    assert graph["data_prep.b"] == {"data_prep.a", "spinefrac.cli"}
    for check, expected in ((test_no_import_circles, "data_prep.a"),
                            (test_imports_run_downward_only, "data_prep.b imports spinefrac.cli")):
        try:
            check()
        except AssertionError as exc:
            assert expected in str(exc)
        else:
            raise AssertionError(f"{check.__name__} missed what was planted")
