"""Fixtures the operator's integration tests share (leader election, HTTP endpoints)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lorakube import leader
from lorakube_dev import sandbox


@pytest.fixture
def operator_kubeconfig(local_cluster) -> Path:
    sandbox.install(local_cluster.cluster.kubectl, "lorakube-e2e-setup")
    token = sandbox.operator_token(local_cluster.cluster.kubectl)
    return local_cluster.kubeconfig_for_token(token, user="lorakube-operator")


@pytest.fixture
def lease_reset(local_cluster) -> Iterator[None]:
    def delete() -> None:
        local_cluster.kubectl("delete", "lease", leader.LEASE_NAME, "-n", sandbox.OPERATOR_NAMESPACE,
                              "--ignore-not-found")
    delete()
    yield
    delete()
