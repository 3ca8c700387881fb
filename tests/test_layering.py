"""Every module imports, and imports point down only: cli → recipes → components → config (DESIGN.md)."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "finetune"
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
    for p in PACKAGE.rglob("*.py")
    if p.name != "__main__.py"
)
BASE = {"finetune.config", "finetune.errors", "finetune.files"}  # the bottom layer: imports nothing else from finetune


def layer(module: str) -> str:
    if module in ("finetune.cli", "finetune", "finetune.demo"):
        return "cli"
    if module.startswith("finetune.recipes"):
        return "recipe"
    if module in BASE:
        return "base"
    return "component"


def finetune_imports(module: str) -> set[str]:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            found.add(node.module)
            found |= {
                f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES
            }
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("finetune")}
    return {m for m in found if m in MODULES and m != "finetune.recipes"}


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module):
    mine = layer(module)
    for dep in finetune_imports(module):
        theirs = layer(dep)
        assert mine != "base", f"{module} is a base module and must not import {dep}"
        if mine == "component":
            assert theirs in ("component", "base"), f"component {module} imports {dep} ({theirs})"
        if mine == "recipe":
            assert theirs in ("component", "base"), f"recipe {module} imports {dep}: recipes never import each other"


def test_config_imports_nothing_from_finetune():
    assert finetune_imports("finetune.config") == set()
