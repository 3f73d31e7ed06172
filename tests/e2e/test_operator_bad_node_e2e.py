"""Bad-node avoidance against the real API server and scheduler: a failure blamed on a node sends
the next attempt's pods to another node, status.excludedNodes says why, and the list is cleared
when the job ends.

The nodes are real Node objects with no kubelet behind them (as in the stuck-restart test), so
the test plays the kubelet: it writes the pod status a kubelet writes when a device plugin fails
at admission (phase Failed, reason UnexpectedAdmissionError), marks a node NotReady the way the
node lifecycle controller does, and finally reports the last pod Succeeded. Everything the
operator does in between (observe, blame, affinity, the scheduler's placement) is real; no trainer
runs, so the test costs seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorakube import nodes
from lorakube_api import contract
from lorakube_dev import sandbox
from localcluster.pytest_plugin import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

POOL = "lorakube.test/bad-node-pool"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _set_ready(local_cluster, name: str, ready: bool) -> None:
    now = _now()
    capacity = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    condition = {"type": "Ready", "status": "True" if ready else "False",
                 "reason": "KubeletReady" if ready else "KubeletNotReady", "message": "a test's stand-in",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
    local_cluster.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p",
                          json.dumps({"status": {"capacity": capacity, "allocatable": capacity,
                                                 "conditions": [condition]}}), check=True)


@pytest.fixture
def pool(local_cluster, job_namespace) -> Iterator[Callable[[int], list[str]]]:
    """Kubelet-less Nodes labelled with this test's pool, Ready and untainted; deleted afterwards."""
    made: list[str] = []

    def make(count: int) -> list[str]:
        for index in range(count):
            name = f"bad-node-{index}-{job_namespace}"
            local_cluster.apply({"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": name, "labels": {"kubernetes.io/hostname": name, POOL: job_namespace}}})
            made.append(name)
            local_cluster.kubectl("patch", "node", name, "--type=merge", "-p", '{"spec":{"taints":null}}',
                                  check=True)
            _set_ready(local_cluster, name, True)
        return list(made)

    yield make
    for name in made:
        local_cluster.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false")


def get(local_cluster, *args: str) -> dict[str, Any] | None:
    result = local_cluster.kubectl("get", *args, "-o", "json")
    return json.loads(result.stdout) if result.returncode == 0 else None


def bound_pod(local_cluster, namespace: str, name: str, attempt: int) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        found = get(local_cluster, "pod", name, "-n", namespace) or {}
        labels = found.get("metadata", {}).get("labels", {})
        if labels.get(contract.LABEL_ATTEMPT) == str(attempt) and found.get("spec", {}).get("nodeName"):
            return found
        return None
    return check


def play_kubelet(local_cluster, namespace: str, pod: str, status: dict[str, Any]) -> None:
    local_cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": status}), check=True)


def test_a_failure_blamed_on_a_node_moves_the_next_attempt_to_another_node(
        local_cluster, job_namespace, pool, start_operator, tmp_path: Path):
    start_operator()
    candidates = pool(3)
    # The user's own required affinity keeps the job in this test's pool; the operator's exclusion
    # must be ANDed into it, not replace it (or the pods would land on the cluster's real node).
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": POOL, "operator": "In", "values": [job_namespace]}]}]}}}
    job = sandbox.quickstart_job(tmp_path, "flaky", resources={"numNodes": 1, "affinity": affinity},
                                 runPolicy={"backoffSeconds": 0, "startupDeadlineSeconds": 3600})
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    pod_name = contract.pod_name("flaky", 0)

    # Attempt 1: the device plugin fails at admission on whichever node the scheduler picked.
    first = wait_for("attempt 1 bound", bound_pod(local_cluster, job_namespace, pod_name, 1), 60)
    bad = first["spec"]["nodeName"]
    assert bad in candidates
    started = time.monotonic()
    play_kubelet(local_cluster, job_namespace, pod_name, {
        "phase": "Failed", "reason": "UnexpectedAdmissionError",
        "message": "Allocate failed due to rpc error: device plugin nvidia.com/gpu is unhealthy"})
    second = wait_for("attempt 2 bound", bound_pod(local_cluster, job_namespace, pod_name, 2), 60)
    moved_after = time.monotonic() - started
    worse = second["spec"]["nodeName"]
    assert worse in candidates and worse != bad
    terms = second["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [{"matchExpressions": [
        {"key": POOL, "operator": "In", "values": [job_namespace]},
        {"key": nodes.HOSTNAME_LABEL, "operator": "NotIn", "values": [bad]}]}]
    status = sandbox.get_job(local_cluster.cluster.kubectl, job_namespace, "flaky")["status"]
    (entry,) = status["excludedNodes"]
    assert (entry["node"], entry["reason"], entry["attempt"]) == (bad, nodes.ADMISSION_ERROR, 1)

    # Attempt 2: its node goes NotReady and the pod fails there; attempt 3 avoids both nodes.
    _set_ready(local_cluster, worse, False)
    play_kubelet(local_cluster, job_namespace, pod_name, {"phase": "Failed", "reason": "NodeShutdown",
                                                          "message": "the node is shutting down"})
    third = wait_for("attempt 3 bound", bound_pod(local_cluster, job_namespace, pod_name, 3), 60)
    (good,) = set(candidates) - {bad, worse}
    assert third["spec"]["nodeName"] == good
    status = sandbox.get_job(local_cluster.cluster.kubectl, job_namespace, "flaky")["status"]
    assert [(e["node"], e["reason"], e["attempt"]) for e in status["excludedNodes"]] == [
        (bad, nodes.ADMISSION_ERROR, 1), (worse, nodes.NODE_NOT_READY, 2)]
    result = local_cluster.kubectl("get", "events", "-n", job_namespace, "-o", "json", "--field-selector",
                                   "involvedObject.name=flaky,reason=NodeExcluded", check=True)
    messages = " ".join(e["message"] for e in json.loads(result.stdout)["items"])
    assert bad in messages and worse in messages and "DeviceAdmissionFailed" in messages

    # The last attempt succeeds: the job ends and its exclusions go with it.
    play_kubelet(local_cluster, job_namespace, pod_name, {"phase": "Succeeded"})
    final = wait_for("the job to succeed", lambda: (s := sandbox.get_job(
        local_cluster.cluster.kubectl, job_namespace, "flaky")["status"]).get("phase") == "Succeeded" and s, 60)
    assert "excludedNodes" not in final
    print(f"bad-node e2e: attempt 2 was on another node {moved_after:.1f}s after attempt 1 failed; "
          f"excluded {bad}, then {worse}; attempt 3 ran on {good}")
