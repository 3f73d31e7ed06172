"""Each image carries only what it runs (DESIGN.md §2):

    lorakube_api (stdlib only)  <-  lorakube (operator image)
    lorakube_api                <-  lorakube_trainer (trainer image)
    lorakube_dev, localcluster  ->  anything (development only, never shipped)

Checked on the source, statically: every import of a shipped package must resolve to the standard
library, to a package its own image ships, or to a third-party distribution that the image's
pyproject extra declares. Shipped code must also not reach outside its package at run time: no
`REPO_ROOT`, no `Path(__file__).parents[...]` climbing out, no subprocess running another
package's module.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {
    "lorakube_api": ROOT / "api" / "lorakube_api",
    "lorakube": ROOT / "operator" / "lorakube",
    "lorakube_trainer": ROOT / "trainer_image" / "lorakube_trainer",
    "lorakube_dev": ROOT / "devtools" / "lorakube_dev",
    "localcluster": ROOT / "localcluster",
}
# What each shipped package's image holds: its own packages and the pyproject extras it installs.
IMAGES = {
    "lorakube_api": {"packages": {"lorakube_api"}, "extras": ()},
    "lorakube": {"packages": {"lorakube", "lorakube_api"}, "extras": ("operator",)},
    "lorakube_trainer": {"packages": {"lorakube_trainer", "lorakube_api"}, "extras": ("trainer", "deepspeed", "quantize")},
}
OWN_PACKAGES = set(PACKAGE_DIRS)
# Imported lazily inside a branch that the code guards, with a clear error when absent (none today:
# modelscope, once optional, is in the trainer extra).
OPTIONAL_IMPORTS: dict[str, set[str]] = {}


def _requirement_names(extras: tuple[str, ...]) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project.get("dependencies", []))
    if extras:
        for extra in extras:
            requirements += project["optional-dependencies"][extra]
    names = set()
    for requirement in requirements:
        names.add(re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def _distribution_of(module: str) -> set[str]:
    return {name.lower().replace("_", "-") for name in importlib.metadata.packages_distributions().get(module, [])}


def _modules(package_dir: Path) -> list[Path]:
    return sorted(path for path in package_dir.rglob("*.py") if "__pycache__" not in path.parts)


def _imports(path: Path) -> set[str]:
    """Top-level module names imported anywhere in the file (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(IMAGES))
def test_shipped_package_imports_only_what_its_image_holds(package: str) -> None:
    image = IMAGES[package]
    declared = _requirement_names(image["extras"])
    stdlib = set(sys.stdlib_module_names) | {"__main__"}
    violations = []
    for path in _modules(PACKAGE_DIRS[package]):
        for module in sorted(_imports(path)):
            if module in stdlib or module in image["packages"] or module in OPTIONAL_IMPORTS.get(package, ()):
                continue
            where = path.relative_to(ROOT)
            if module in OWN_PACKAGES:
                violations.append(f"{where}: imports {module}, which the {package} image does not ship")
            elif not (_distribution_of(module) & declared):
                violations.append(f"{where}: imports {module}, not declared by the extras {image['extras'] or '(none)'} "
                                  "in pyproject.toml")
    assert not violations, "\n".join(violations)


def test_the_api_package_is_standard_library_only() -> None:
    stdlib = set(sys.stdlib_module_names)
    used = {module for path in _modules(PACKAGE_DIRS["lorakube_api"]) for module in _imports(path)}
    assert used <= stdlib | {"lorakube_api"}, used - stdlib


def _climbs_out_of_package(node: ast.AST) -> bool:
    """`….parents[N]` with N >= 1, or `.parent.parent` (a module's parent is its package)."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
        index = node.slice
        return not (isinstance(index, ast.Constant) and index.value == 0)
    return (isinstance(node, ast.Attribute) and node.attr == "parent"
            and isinstance(node.value, ast.Attribute) and node.value.attr == "parent")


@pytest.mark.parametrize("package", sorted(IMAGES))
def test_shipped_package_does_not_reach_into_the_source_checkout(package: str) -> None:
    others = sorted(OWN_PACKAGES - IMAGES[package]["packages"])
    violations = []
    for path in _modules(PACKAGE_DIRS[package]):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "REPO_ROOT":
                violations.append(f"{where}:{node.lineno}: REPO_ROOT")
            elif _climbs_out_of_package(node):
                violations.append(f"{where}:{node.lineno}: a path above the package ({ast.unparse(node)})")
            elif isinstance(node, (ast.List, ast.Tuple)):
                # `[sys.executable, "-m", "other.module", ...]`: a subprocess into another package.
                words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                for flag, module in zip(words, words[1:]):
                    if flag == "-m" and isinstance(module, str) and module.split(".")[0] in others:
                        violations.append(f"{where}:{node.lineno}: runs `-m {module}`")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                for other in others:
                    if f"{other}/" in node.value:
                        violations.append(f"{where}:{node.lineno}: a path into {other}: {node.value!r}")
    assert not violations, "\n".join(violations)


def test_the_operator_cli_no_longer_carries_the_demo() -> None:
    from lorakube import cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo"])


def test_the_packaged_crd_is_the_source_in_crds() -> None:
    from lorakube_dev import sync_crd

    assert sync_crd.stale(sync_crd.SOURCE.read_text()) == [], "run python -m lorakube_dev.sync_crd"


def test_the_charts_crd_is_the_source_once_the_template_lines_are_stripped() -> None:
    from lorakube_dev import sync_crd

    template = sync_crd.CHART_CRD.read_text()
    assert sync_crd.strip_chart_template(template) == sync_crd.SOURCE.read_text(), "run python -m lorakube_dev.sync_crd"
    # What the stripped lines are: the crds.install switch and the keep annotation, nothing else.
    added = [line for line in template.splitlines() if line not in sync_crd.SOURCE.read_text().splitlines()]
    assert added == [
        sync_crd.CHART_HEADER.splitlines()[0], "{{- if .Values.crds.install }}",
        "  annotations:", "    helm.sh/resource-policy: keep", "{{- end }}",
    ]
