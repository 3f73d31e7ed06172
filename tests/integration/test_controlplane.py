"""The local control plane is a real one: versions, controllers, and a clean shutdown."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from localcluster.cluster import ClusterState, LocalCluster, leftovers
from localcluster.processes import mounts_under, port_in_use, process_start_time
from localcluster.versions import KUBERNETES_VERSION

pytestmark = pytest.mark.cluster


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_kubectl_client_and_server_report_the_pinned_version(local_cluster):
    result = local_cluster.kubectl("version", "-o", "json", check=True)
    versions = json.loads(result.stdout)
    assert versions["clientVersion"]["gitVersion"] == KUBERNETES_VERSION
    assert versions["serverVersion"]["gitVersion"] == KUBERNETES_VERSION


def test_every_component_listens_on_loopback_only(local_cluster):
    state = ClusterState.load(local_cluster.state_dir)
    assert state is not None
    for port in state.ports.values():
        assert port_in_use(port, "127.0.0.1"), f"nothing listens on 127.0.0.1:{port}"
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    # /proc/net/tcp: local address as HEXIP:HEXPORT, state 0A = LISTEN.
    wildcard_ports = {
        int(fields[1].split(":")[1], 16)
        for fields in (line.split() for line in listening)
        if fields[3] == "0A" and fields[1].split(":")[0] == "00000000"
    }
    assert not wildcard_ports & set(state.ports.values())


def test_namespace_deletion_completes(local_cluster):
    name = local_cluster.create_namespace()
    local_cluster.kubectl("create", "configmap", "payload", "-n", name, "--from-literal=a=b",
                          check=True)
    local_cluster.kubectl("delete", "namespace", name, "--wait=false", check=True)
    _wait_until(
        lambda: local_cluster.kubectl("get", "namespace", name).returncode != 0,
        timeout=90, what=f"namespace {name} to be deleted",
    )


def test_garbage_collector_deletes_dependents_of_a_deleted_owner(local_cluster, new_namespace):
    local_cluster.kubectl("create", "configmap", "owner", "-n", new_namespace, check=True)
    owner = local_cluster.get_json("configmap", "owner", namespace=new_namespace)
    local_cluster.apply({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": "dependent", "namespace": new_namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                 "uid": owner["metadata"]["uid"]}],
        },
        "data": {"k": "v"},
    })
    local_cluster.kubectl("delete", "configmap", "owner", "-n", new_namespace, check=True)
    _wait_until(
        lambda: local_cluster.kubectl("get", "configmap", "dependent", "-n", new_namespace)
        .returncode != 0,
        timeout=60, what="the dependent ConfigMap to be garbage-collected",
    )
    # The GC must not be over-eager: an unowned ConfigMap in the same namespace stays.
    local_cluster.kubectl("get", "configmap", "kube-root-ca.crt", "-n", new_namespace, check=True)


def test_down_leaves_no_processes_ports_or_mounts(tmp_path, local_cluster):
    # A second, private cluster (control plane only), so the session cluster stays up.
    cluster = LocalCluster(tmp_path / "state", nodes=[])
    cluster.up()
    try:
        state = ClusterState.load(cluster.state_dir)
        assert all(Path(f"/proc/{record.pid}").exists() for record in state.records())
        result = cluster.kubectl("get", "--raw", "/readyz")
        assert result.returncode == 0 and result.stdout.strip() == "ok"
    finally:
        problems = cluster.down()
    assert problems == []
    assert leftovers(state, cluster.state_dir) == []
    for record in state.records():
        # Gone, or (if the pid was reused meanwhile) a different process than the one started.
        assert process_start_time(record.pid) != record.start_time, f"{record.name} still runs"
    for port in state.ports.values():
        assert not port_in_use(port), f"127.0.0.1:{port} still listening after down"
    assert mounts_under(cluster.state_dir) == []
    assert not cluster.status().up
