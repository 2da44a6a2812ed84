"""The packages' layout (docs/architecture.md "Packages"): every module imports, and imports only
go down: nothing in ``pipeline`` imports ``trainer``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _imported(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` names (at any depth in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("name", _modules("pipeline") + _modules("trainer"))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_pipeline_never_imports_trainer():
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "pipeline").rglob("*.py"))
        for name in _imported(path)
        if name == "trainer" or name.startswith("trainer.")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_layout_test_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from trainer.model import factory\n")
    assert "trainer.model" in _imported(bad)


def test_no_flat_module_is_left_beside_a_package():
    """A module moved into a package leaves nothing behind that could shadow it."""
    for package in ("pipeline", "trainer"):
        for folder in (ROOT / package).iterdir():
            if folder.is_dir() and (folder / "__init__.py").exists():
                assert not (ROOT / package / f"{folder.name}.py").exists(), folder


def test_no_package_shadows_the_standard_library():
    """Ray workers run with the repository root on their path; a package named like a standard
    module (``inspect``) would break them, and any tool that puts a package folder on sys.path."""
    import sys

    names = {
        path.stem if path.is_file() else path.name
        for package in ("pipeline", "trainer")
        for path in (ROOT / package).rglob("*")
        if path.suffix == ".py" or (path / "__init__.py").exists()
    }
    assert not names & set(sys.stdlib_module_names) - {"__init__", "__main__"}
