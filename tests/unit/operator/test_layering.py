"""The operator's layering: decisions are pure, one module talks to the API, no torch anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lorakube

PACKAGE = Path(lorakube.__file__).parent
PURE = ("spec", "builders", "rbac", "pods", "failures", "status", "reconcile")
API_CLIENTS = {"kopf", "kubernetes", "aiohttp", "urllib3", "requests"}


def imported_roots(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_api_client(module):
    assert not imported_roots(module) & API_CLIENTS


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_the_operator_never_imports_the_trainer_stack(module):
    assert not imported_roots(module) & {"torch", "lightning", "diffusers", "lorakube_trainer", "deepspeed"}
