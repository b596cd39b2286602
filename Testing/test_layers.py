"""The core's layers, read from its source: io -> preprocessing -> models -> engines -> CLI, worker and benchmarks;
no Slicer, Qt or VTK import anywhere in the core; engines reach networks only through the interfaces."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "FMSegCore"
GUI = ("slicer", "qt", "vtk", "ctk", "PythonQt", "PySide6", "PyQt5", "PyQt6")
#: package (or module) -> the FMSegCore packages it must not import
FORBIDDEN = {
    "io": ("engines", "models", "server", "cli", "bench", "training", "zoo"),
    "preprocessing": ("engines", "models", "server", "cli", "bench", "training", "zoo"),
    "prompts.py": ("io", "preprocessing", "engines", "models", "server", "cli", "bench", "training", "zoo"),
    "progress.py": ("io", "preprocessing", "engines", "models", "server", "cli", "bench", "training", "zoo"),
    # the options every entry point reads: below the engines (which read their defaults from it)
    "options.py": ("io", "preprocessing", "engines", "models", "server", "cli", "bench", "training"),
    "models": ("engines", "server", "cli", "bench", "training"),
    "zoo": ("engines", "server", "cli", "bench", "training"),
    "engines": ("server", "cli", "bench", "training"),
}


def imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names), wherever in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files(part: str) -> list[Path]:
    target = CORE / part
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


def test_the_core_imports_no_gui_toolkit():
    offenders = [f"{path.relative_to(CORE)}: {name}" for path in files(".") for name in imports(path)
                 if name.split(".")[0] in GUI]
    assert offenders == []


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(part):
    banned = tuple(f"FMSegCore.{name}" for name in FORBIDDEN[part])
    offenders = [f"{path.relative_to(CORE)}: {name}" for path in files(part) for name in imports(path)
                 if name.startswith(banned) and name.split(".")[:2] != ["FMSegCore", part.removesuffix(".py")]]
    assert offenders == []


def test_engines_reach_networks_only_through_the_interfaces_and_the_factory():
    allowed = ("FMSegCore.models.interfaces", "FMSegCore.models.factory")
    offenders = [f"{path.relative_to(CORE)}: {name}" for path in files("engines") for name in imports(path)
                 if name.startswith("FMSegCore.models") and name not in allowed]
    assert offenders == []


def test_the_rule_catches_an_upward_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from FMSegCore.engines.prompting import session\n")
    assert "FMSegCore.engines.prompting" in imports(sample)
