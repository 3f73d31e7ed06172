"""pytest fixtures for a real local cluster: ``local_cluster`` (session) and ``new_namespace``.

Load it with ``pytest_plugins = ["localcluster.pytest_plugin"]``. The session builds the binaries
when they are not cached yet and fails (never skips) when that is impossible: a test that needs a
cluster and silently does not run proves nothing. Tests using ``local_cluster`` get the ``cluster``
marker automatically, so ``-m "not cluster"`` leaves them out.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import kubeconfig as kubeconfig_mod
from localcluster.cluster import LocalCluster, default_nodes

NODES_ENV = "LOCALCLUSTER_NODES"
# Crash loops restart after 1, 2, 4, 4 ... s instead of kubelet's 10 s doubling to 5 min, so
# restart tests (and Deployments that crash at start) take seconds. Reuse it when a test
# restarts the node daemon.
NODE_RESTART_BACKOFF = (1.0, 4.0)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("localcluster")
    group.addoption(
        "--localcluster-nodes", type=int, default=int(os.environ.get(NODES_ENV, "1")),
        help=f"process nodes the session cluster registers (default 1, or ${NODES_ENV})",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "local_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
        if "kueue" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kueue)
        if "training_operator" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.training_operator)


class ClusterHandle:
    """What a test needs from the running cluster, with kubectl as the client of record."""

    def __init__(self, cluster: LocalCluster, scratch: Path) -> None:
        self.cluster = cluster
        self._scratch = scratch

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    @property
    def server(self) -> str:
        return self.cluster.server

    @property
    def ca_file(self) -> Path:
        return self.cluster.ca_file

    @property
    def state_dir(self) -> Path:
        return self.cluster.state_dir

    @property
    def kubectl_path(self) -> Path:
        return self.cluster.binaries.kubectl

    @property
    def helm_path(self) -> Path:
        return self.cluster.binaries.helm

    def kubectl(self, *args: str, input: str | None = None, check: bool = False,
                kubeconfig: Path | None = None, timeout: float = 120.0
                ) -> subprocess.CompletedProcess[str]:
        """Run the cluster's kubectl as admin (or with ``kubeconfig``); ``check`` fails the test
        with kubectl's stderr when it exits non-zero."""
        result = self.cluster.kubectl(*args, input=input, timeout=timeout, kubeconfig=kubeconfig)
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def apply(self, manifest: str | dict[str, Any] | list[dict[str, Any]],
              namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """Server-side create-or-update of YAML text or object(s), as admin."""
        if not isinstance(manifest, str):
            documents = manifest if isinstance(manifest, list) else [manifest]
            manifest = yaml.safe_dump_all(documents)
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        return self.kubectl(*args, input=manifest, check=True)

    def get_json(self, *args: str, namespace: str | None = None) -> dict[str, Any]:
        ns = ["-n", namespace] if namespace else []
        return yaml.safe_load(self.kubectl("get", *args, *ns, "-o", "json", check=True).stdout)

    def create_namespace(self, name: str | None = None,
                         labels: dict[str, str] | None = None, timeout: float = 60.0) -> str:
        """A namespace that is ready for pods (its `default` ServiceAccount exists)."""
        name = name or f"t-{uuid.uuid4().hex[:10]}"
        self.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels or {}}})
        deadline = time.monotonic() + timeout
        while self.kubectl("get", "serviceaccount", "default", "-n", name).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail(f"namespace {name}: no `default` ServiceAccount after {timeout:.0f} s")
            time.sleep(0.2)
        return name

    def delete_namespace(self, name: str, wait: bool = False) -> None:
        self.kubectl("delete", "namespace", name, "--ignore-not-found", f"--wait={str(wait).lower()}")

    def token_for(self, namespace: str, service_account: str, duration: str = "1h",
                  audience: str | None = None) -> str:
        """A token minted by the TokenRequest API for that ServiceAccount (not impersonation)."""
        args = ["create", "token", service_account, "-n", namespace, f"--duration={duration}"]
        if audience:
            args.append(f"--audience={audience}")
        return self.kubectl(*args, check=True).stdout.strip()

    def kubeconfig_for_token(self, token: str, user: str = "token-user") -> Path:
        path = self._scratch / f"{user}-{uuid.uuid4().hex[:8]}.kubeconfig"
        return kubeconfig_mod.write_for_token(path, self.server, self.ca_file, user, token)

    def kubeconfig_for_service_account(self, namespace: str, service_account: str) -> Path:
        token = self.token_for(namespace, service_account)
        return self.kubeconfig_for_token(token, user=f"{namespace}-{service_account}")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.3) -> Any:
    """Poll `check` until it returns something truthy (returned) or fail the test naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="session")
def local_cluster(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    """A control plane plus process node for the whole session; KUBECONFIG points at it."""
    node_count = request.config.getoption("--localcluster-nodes")
    state_dir = tmp_path_factory.mktemp("localcluster")
    cluster = LocalCluster(
        state_dir, nodes=default_nodes(node_count) if node_count else [],
        # Pods run this environment's console scripts, offline like the rest of the suite.
        node_env={"HF_HUB_OFFLINE": "1"},
        node_restart_backoff=NODE_RESTART_BACKOFF,
    )
    with pytest.MonkeyPatch.context() as env:
        try:
            cluster.up()
        except Exception as error:
            pytest.fail(f"the local cluster did not come up: {error}", pytrace=False)
        env.setenv("KUBECONFIG", str(cluster.kubeconfig))
        try:
            yield ClusterHandle(cluster, tmp_path_factory.mktemp("kubeconfigs"))
        finally:
            leftovers = cluster.down()
    assert not leftovers, f"localcluster down left things behind: {leftovers}"


@pytest.fixture
def new_namespace(local_cluster: ClusterHandle) -> Iterator[str]:
    """A fresh namespace per test, deleted (without waiting) afterwards."""
    name = local_cluster.create_namespace()
    yield name
    local_cluster.delete_namespace(name)


@pytest.fixture(scope="session")
def kueue(local_cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Kueue's manager (built on first use, cached by version key) with its CRDs and webhooks,
    for the whole session. Its pod integration manages only namespaces labelled
    ``localcluster.kueue.MANAGED_LABEL`` (see ``kueue_namespace``). Fails, never skips."""
    from localcluster import kueue as kueue_mod

    yield from _installed(kueue_mod, "Kueue", local_cluster, tmp_path_factory.mktemp("kueue"))


@pytest.fixture(scope="session")
def training_operator(local_cluster: ClusterHandle,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Kubeflow's training-operator (built on first use, cached by version key) with its
    PyTorchJob CRD, for the whole session: see ``localcluster.training_operator``. Fails, never
    skips."""
    from localcluster import training_operator as peer

    yield from _installed(peer, "the training-operator", local_cluster, tmp_path_factory.mktemp("training-operator"))


def _installed(module: Any, what: str, local_cluster: ClusterHandle, state_dir: Path) -> Iterator[Any]:
    """A controller a localcluster module installs into the session's cluster (`install`/`uninstall`),
    for the fixture's lifetime; a failed install fails the test naming `what`, never skips it."""
    try:
        running = module.install(local_cluster.kubectl, local_cluster.kubeconfig, state_dir, log=lambda _: None)
    except Exception as error:
        pytest.fail(f"{what} could not be installed: {error}", pytrace=False)
    try:
        yield running
    finally:
        module.uninstall(running, local_cluster.kubectl)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 server (versitygw, POSIX backend) on 127.0.0.1 for one test module; see s3server.py.
    Its binary comes from `python -m localcluster build s3` (built on first use, then cached)."""
    from localcluster.s3server import S3Server

    server = S3Server.start(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Google Cloud Storage emulator (fake-gcs-server) on 127.0.0.1, once per test session (each
    test uses its own buckets); see gcsserver.py. Its binary comes from `python -m localcluster build
    gcs` (built on first use, then cached)."""
    from localcluster.gcsserver import GcsServer

    server = GcsServer.start(tmp_path_factory.mktemp("gcs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An Azure Blob Storage emulator (Azurite) on 127.0.0.1, once per test session (each test uses
    its own containers); see azurite.py. Installed by `python -m localcluster build azurite` (on
    first use, then cached)."""
    from localcluster.azurite import AzuriteServer

    server = AzuriteServer.start(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()
