"""End-to-end fixtures: the real control plane, the process node, the real trainer, and the
operator as its own process under the operator ServiceAccount's token (so its RBAC is proven)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from localcluster.recorder import WatchRecorder
from localcluster.s3server import S3Server
from lorakube_api import contract
from lorakube_dev import sandbox
from localcluster.node.hostregistry import GATEWAY

# Opt-in: set to a folder, and every version of every LoRATrainingJob the e2e tests create is
# written there as JSON (tests/fixtures/job-statuses/ holds a few, for the Argo CD health check).
RECORD_ENV = "LORAKUBE_RECORD_STATUSES"
BRIDGE_ADDRESS = str(GATEWAY)     # the host as pods of the process node see it (node/README.md)


@pytest.fixture(scope="session")
def operator_kubeconfig(local_cluster) -> Path:
    """CRD + RBAC installed; a kubeconfig holding a TokenRequest token of the operator's SA."""
    sandbox.install(local_cluster.cluster.kubectl, "lorakube-e2e-setup")
    token = sandbox.operator_token(local_cluster.cluster.kubectl)
    return local_cluster.kubeconfig_for_token(token, user="lorakube-operator")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The tiny FLUX pipeline, the example dataset and an output folder, mounted into the pods."""
    return sandbox.prepare_data(tmp_path_factory.mktemp("lorakube-data"), log=lambda _: None)


@pytest.fixture
def job_namespace(new_namespace, local_cluster, request, tmp_path_factory) -> Iterator[str]:
    """A fresh namespace, as a user has it: nothing applied by hand (the operator makes each job's
    trainer account and Role). With $LORAKUBE_RECORD_STATUSES set, its jobs are recorded."""
    target = os.environ.get(RECORD_ENV)
    if not target:
        yield new_namespace
        return
    scrub = {str(request.getfixturevalue("data_dir")): "/srv/lorakube-data",
             str(Path(__file__).resolve().parents[2]): "/src/lorakube",
             str(tmp_path_factory.getbasetemp()): "/tmp/lorakube-e2e",
             **{entry: "/usr/lib/python3/site-packages" for entry in sys.path if entry.endswith("-packages")},
             sys.prefix: "/usr", sys.base_prefix: "/usr", str(Path.home()): "/home/user"}
    folder = Path(target) / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    recorder = WatchRecorder(local_cluster.kubectl_path, local_cluster.kubeconfig,
                             f"{contract.PLURAL}.{contract.API_GROUP}", new_namespace, folder, scrub)
    try:
        yield new_namespace
    finally:
        recorder.stop()


@pytest.fixture
def start_operator(operator_kubeconfig, tmp_path) -> Iterator:
    """Start `lorakube operator` processes; every one still running is stopped afterwards."""
    started: list[sandbox.OperatorProcess] = []

    def start() -> sandbox.OperatorProcess:
        process = sandbox.OperatorProcess(operator_kubeconfig, tmp_path / f"operator-{len(started)}.log",
                                          env={"LORAKUBE_RECONCILE_INTERVAL_SECONDS": "5"})
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.stop()
    for process in started:
        print(f"--- {process.log_path.name} ---\n{process.log_text()[-6000:]}")


@pytest.fixture
def start_bridge_s3(local_cluster, tmp_path) -> Iterator[Callable[..., S3Server]]:
    """Start real S3 servers (versitygw) on the node bridge's address, which only the host and its
    pods reach; each has its own data and root keys. `start_bridge_s3("b", like=a, read_only=True)`
    is a second gateway over a's data and keys that refuses writes. All are stopped afterwards.
    (The bridge exists while the node runs, hence the local_cluster fixture first.)"""
    started: list[S3Server] = []

    def start(name: str, like: S3Server | None = None, read_only: bool = False) -> S3Server:
        state = tmp_path / f"s3-{name}"
        server = (like.sibling(state, read_only) if like is not None
                  else S3Server.start(state, host=BRIDGE_ADDRESS, read_only=read_only))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
