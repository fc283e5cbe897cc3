"""The package's import rules, read from the AST of every module (docs/architecture.md).

- Dependencies point one way, down the layers: each folder imports only the folders below it.
- Only the FUSE operations module raises ``pyfuse3.FUSEError``.
- Only ``registry/`` imports httpx; importing the resolver does not load it.
- ``model/`` imports nothing above it; nothing imports ``cli/`` but the entry point.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lazyfs"

# unit -> the units it may import. A unit is a folder of the package, or a top-level module.
LEAVES = {"errors", "config"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": set(),
    "__init__": set(),
    "model": LEAVES,
    "localfiles": LEAVES | {"model"},
    "formats": LEAVES | {"model"},
    "cache": LEAVES | {"model", "localfiles"},
    "registry": LEAVES | {"model", "localfiles", "__init__"},
    "convert": LEAVES | {"model", "localfiles", "formats", "registry"},
    "mount": LEAVES | {"model", "localfiles", "formats", "cache", "registry", "convert"},
    "bundle": LEAVES | {"model", "localfiles", "formats", "cache", "registry", "convert", "mount"},
    "service": LEAVES
    | {"model", "localfiles", "formats", "cache", "registry", "convert", "mount", "__init__"},
    "bench": LEAVES
    | {"model", "localfiles", "formats", "cache", "registry", "convert", "mount", "service"}
    | {"__init__"},
    "cli": set(),  # the top: it may import anything (checked separately below)
    "__main__": {"cli"},
}
FUSE_OPERATIONS = "lazyfs/mount/fuseops.py"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module's path, relative to the repository
    unit: str  # the importing module's unit
    target: str  # the imported module, dotted


def _unit(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, at any depth (function bodies and TYPE_CHECKING too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            # ``from lazyfs import x`` imports lazyfs.x when x is a module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _lazyfs_unit(target: str) -> str | None:
    parts = target.split(".")
    if parts[0] != "lazyfs":
        return None
    if len(parts) == 1:
        return "__init__"
    name = parts[1]
    if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file():
        return name
    return "__init__"  # a name defined in lazyfs/__init__.py, such as __version__


def _all_imports() -> list[Import]:
    root = PACKAGE.parent
    return [
        Import(str(path.relative_to(root)), _unit(path), target)
        for path in _modules()
        for target in _imports(path)
    ]


IMPORTS = _all_imports()


def test_every_unit_has_a_rule() -> None:
    assert {_unit(path) for path in _modules()} <= set(ALLOWED)


@pytest.mark.parametrize("unit", sorted(set(ALLOWED) - {"cli"}))
def test_dependencies_point_down(unit: str) -> None:
    wrong = sorted(
        f"{imp.module} imports {imp.target}"
        for imp in IMPORTS
        if imp.unit == unit
        and (target := _lazyfs_unit(imp.target)) is not None
        and target != unit
        and target not in ALLOWED[unit]
    )
    assert wrong == []


def test_nothing_imports_cli_but_the_entry_point() -> None:
    wrong = sorted(
        f"{imp.module} imports {imp.target}"
        for imp in IMPORTS
        if _lazyfs_unit(imp.target) == "cli" and imp.unit not in {"cli", "__main__"}
    )
    assert wrong == []


def test_no_import_cycle_between_folders() -> None:
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        target = _lazyfs_unit(imp.target)
        if target is not None and target != imp.unit:
            edges.setdefault(imp.unit, set()).add(target)
    assert _cycle(edges) is None


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for successor in sorted(edges.get(node, ())):
            found = visit(successor, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(edges):
        found = visit(start, [])
        if found:
            return found
    return None


def test_only_registry_imports_httpx() -> None:
    wrong = sorted(
        imp.module
        for imp in IMPORTS
        if imp.target.split(".")[0] in {"httpx", "httpcore"} and imp.unit != "registry"
    )
    assert wrong == []


def test_only_the_fuse_operations_module_raises_fuse_error() -> None:
    raisers = set()
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None and _names_fuse_error(node.exc):
                raisers.add(str(path.relative_to(PACKAGE.parent)))
    assert raisers == {FUSE_OPERATIONS}


def _names_fuse_error(expr: ast.expr) -> bool:
    target = expr.func if isinstance(expr, ast.Call) else expr
    if isinstance(target, ast.Attribute):
        return target.attr == "FUSEError"
    return isinstance(target, ast.Name) and target.id == "FUSEError"


@pytest.mark.parametrize(
    "module",
    ["lazyfs.mount.resolver", "lazyfs.mount.tree", "lazyfs.cache.store", "lazyfs.formats.estargz"],
)
def test_module_does_not_load_httpx(module: str) -> None:
    code = f"import sys, {module}; assert 'httpx' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
