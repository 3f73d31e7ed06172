"""The local control plane is a real one: versions, controllers, and a clean shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localcluster.cluster import ClusterState, leftovers
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


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localcluster", *args],
                          capture_output=True, text=True, timeout=300)


def test_up_survives_the_command_and_down_leaves_no_processes_ports_or_mounts(
        tmp_path, local_cluster):
    # A second, control-plane-only cluster driven through the CLI; the session cluster stays up.
    state_dir = tmp_path / "state"
    up = _cli("up", "--nodes", "0", "--state-dir", str(state_dir))
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={state_dir / 'admin.kubeconfig'}" in up.stdout
    state = ClusterState.load(state_dir)
    try:
        # `up` has exited; the daemons it started keep serving.
        assert all(Path(f"/proc/{record.pid}").exists() for record in state.records())
        assert _cli("status", "--state-dir", str(state_dir)).returncode == 0
        kubeconfig = _cli("kubeconfig", "--state-dir", str(state_dir))
        assert kubeconfig.returncode == 0 and kubeconfig.stdout.strip() == str(
            (state_dir / "admin.kubeconfig").resolve())
        again = _cli("up", "--nodes", "0", "--state-dir", str(state_dir))
        assert again.returncode == 0 and "already up" in again.stdout, again.stderr
        assert ClusterState.load(state_dir) == state, "a second `up` must not restart anything"
        ready = local_cluster.kubectl("get", "--raw", "/readyz",
                                      kubeconfig=state_dir / "admin.kubeconfig")
        assert ready.returncode == 0 and ready.stdout.strip() == "ok"
    finally:
        down = _cli("down", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    for record in state.records():
        stat = Path(f"/proc/{record.pid}/stat")
        if stat.exists() and process_start_time(record.pid) == record.start_time:
            # Only an exited process waiting for its parent (init) to reap it may remain.
            assert stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", f"{record.name} runs"
    for port in state.ports.values():
        assert not port_in_use(port), f"127.0.0.1:{port} still listening after down"
    assert mounts_under(state_dir) == []
    assert leftovers(state.records(), list(state.ports.values()), state_dir) == []
    assert _cli("status", "--state-dir", str(state_dir)).returncode != 0
    assert _cli("kubeconfig", "--state-dir", str(state_dir)).returncode == 3
