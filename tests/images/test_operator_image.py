"""The operator image (Dockerfile at the repository root), run as its own user."""

from __future__ import annotations

import pytest

from imagelib import ImageContainer, assert_import_fails

pytestmark = pytest.mark.images

OPERATOR_UID = "10002"


def test_operator_image_config_runs_the_operator_as_non_root(operator_image: ImageContainer) -> None:
    assert operator_image.user == OPERATOR_UID
    assert operator_image.entrypoint == ["lorakube", "operator"]
    # The default arguments watch every namespace; /healthz, /readyz and /metrics are served on
    # 0.0.0.0:8080 by default (--http-address), where the chart's probes and Service look.
    assert operator_image.config["Cmd"] == ["--all-namespaces"]
    assert "8080/tcp" in operator_image.config.get("ExposedPorts", {})


def test_operator_image_answers_help_through_its_entrypoint(operator_image: ImageContainer) -> None:
    whoami = operator_image.run(["id", "-u"])
    assert whoami.returncode == 0, whoami.stderr
    assert whoami.stdout.strip() == OPERATOR_UID

    result = operator_image.run([*operator_image.entrypoint, "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lorakube operator")
    for flag in ("--all-namespaces", "--leader-elect", "--http-address"):
        assert flag in result.stdout


@pytest.mark.parametrize("module", ["torch", "lorakube_trainer", "lorakube_dev", "localcluster"])
def test_operator_image_carries_no_trainer_and_no_devtools(operator_image: ImageContainer, module: str) -> None:
    assert_import_fails(operator_image, module)


def test_operator_image_holds_what_the_operator_imports(operator_image: ImageContainer) -> None:
    result = operator_image.run(["python", "-c", "import kopf, kubernetes, lorakube.handlers, lorakube_api.contract"])
    assert result.returncode == 0, result.stderr
