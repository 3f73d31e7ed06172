"""A gang restart whose old pods do not go: it says what it waits for, and a lost node does not
block it. The operator runs as its own process under its ServiceAccount's token (so its `get` on
nodes is proven), against the real API server, scheduler and pod garbage collector.

A lost node is played by a real Node object with no kubelet behind it, which is what the API server
sees of a node that died: its pods stay bound and Pending, and a pod deleted there stays
Terminating forever because no kubelet confirms. The test marks the Node Ready (and lifts the
not-ready taint the API server puts on new Nodes) so the scheduler binds the job's pod to it.
Nothing runs the trainer, so these tests cost seconds of CPU, not a training run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lorakube import reconcile
from lorakube_api import contract
from lorakube_dev import sandbox
from localcluster.pytest_plugin import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

HOLD = "example.com/hold"


@pytest.fixture
def lost_node(local_cluster, job_namespace) -> Iterator[Callable[[str], str]]:
    """Makes kubelet-less Nodes, Ready and schedulable; those the test did not delete go at the end."""
    made: list[str] = []

    def make(suffix: str) -> str:
        name = f"lost-{suffix}-{job_namespace}"
        local_cluster.apply({"apiVersion": "v1", "kind": "Node",
                             "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}})
        made.append(name)
        local_cluster.kubectl("patch", "node", name, "--type=merge", "-p", '{"spec":{"taints":null}}', check=True)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        capacity = {"cpu": "8", "memory": "32Gi", "pods": "110"}
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "a test's stand-in",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
        local_cluster.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p",
                              json.dumps({"status": {"capacity": capacity, "allocatable": capacity,
                                                     "conditions": [ready]}}), check=True)
        return name

    yield make
    for name in made:
        local_cluster.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false")


def pinned_job(tmp_path: Path, name: str, node: str) -> dict[str, Any]:
    return sandbox.quickstart_job(
        tmp_path, name,
        resources={"numNodes": 1, "nodeSelector": {"kubernetes.io/hostname": node}},
        # No kubelet ever starts the pod: keep the startup deadline out of the way; restart at once.
        runPolicy={"backoffSeconds": 0, "startupDeadlineSeconds": 3600})

def pod(local_cluster, namespace: str, name: str) -> dict[str, Any] | None:
    result = local_cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json")
    return json.loads(result.stdout) if result.returncode == 0 else None


def job_status(local_cluster, namespace: str, name: str) -> dict[str, Any]:
    return (sandbox.get_job(local_cluster.cluster.kubectl, namespace, name) or {}).get("status") or {}


def restarting_message(local_cluster, namespace: str, name: str) -> str:
    status = job_status(local_cluster, namespace, name)
    found = [c for c in status.get("conditions", []) if c["type"] == "Restarting" and c["status"] == "True"]
    return found[0].get("message", "") if found and status.get("phase") == "Restarting" else ""


def events(local_cluster, namespace: str, job: str, reason: str) -> list[str]:
    result = local_cluster.kubectl("get", "events", "-n", namespace, "-o", "json", "--field-selector",
                                   f"involvedObject.name={job},reason={reason}", check=True)
    return [e["message"] for e in json.loads(result.stdout)["items"]]


def start_bound_job(local_cluster, namespace: str, tmp_path: Path, name: str, node: str) -> str:
    sandbox.apply_job(local_cluster.cluster.kubectl, namespace, pinned_job(tmp_path, name, node))
    first = contract.pod_name(name, 0)
    wait_for(f"{first} bound to {node}",
             lambda: ((pod(local_cluster, namespace, first) or {}).get("spec") or {}).get("nodeName") == node, 60)
    return first


def test_a_stuck_restart_names_what_holds_it_and_a_deleted_node_does_not_block_it(
        local_cluster, job_namespace, lost_node, start_operator, tmp_path):
    """Two jobs side by side (one wait instead of two): `held` has a pod with a finalizer that
    never clears, `stranded` a pod whose node is then deleted. Someone deletes each job's pod; both
    gangs restart and attempt 2 waits for the old pod."""
    start_operator()
    held_node, stranded_node = lost_node("held"), lost_node("stranded")
    held = start_bound_job(local_cluster, job_namespace, tmp_path, "held", held_node)
    stranded = start_bound_job(local_cluster, job_namespace, tmp_path, "stranded", stranded_node)
    local_cluster.kubectl("patch", "pod", held, "-n", job_namespace, "--type=merge",
                          "-p", json.dumps({"metadata": {"finalizers": [HOLD]}}), check=True)
    try:
        for name in (held, stranded):
            local_cluster.kubectl("delete", "pod", name, "-n", job_namespace, "--grace-period=1", "--wait=false",
                                  check=True)
        budget = reconcile.TERMINATION_MARGIN_SECONDS + 30

        # (a) The restart says what it waits for: which pod, since when, which finalizer, the node.
        message = wait_for("the Restarting condition to say what the restart waits for",
                           lambda: (m := restarting_message(local_cluster, job_namespace, "held")) and "waits" in m
                           and m, budget)
        assert message.startswith(f"attempt 2 waits for pods of an earlier attempt to go: {held} (")
        assert f"finalizers {HOLD}" in message and f"node {held_node} Ready" in message
        assert "grace 1s" in message
        waiting = events(local_cluster, job_namespace, "held", "WaitingForPods")
        assert waiting and HOLD in waiting[0]

        # (b) The stranded pod's node dies for good. Kubernetes' pod garbage collector would remove
        # its pods only after a 40 s quarantine; the operator force-deletes on its next pass.
        wait_for("the restart to report the pod stuck on a Ready node",
                 lambda: f"node {stranded_node} Ready" in restarting_message(local_cluster, job_namespace, "stranded"),
                 budget)
        deleted = time.monotonic()
        local_cluster.kubectl("delete", "node", stranded_node, check=True)

        def second_attempt() -> dict[str, Any] | None:
            found = pod(local_cluster, job_namespace, stranded)
            labels = (found or {}).get("metadata", {}).get("labels", {})
            return found if labels.get(contract.LABEL_ATTEMPT) == "2" else None

        wait_for("the pod of attempt 2", second_attempt, 35)
        assert time.monotonic() - deleted < 35
        forced = events(local_cluster, job_namespace, "stranded", "ForceDeleted")
        assert forced and stranded in forced[0] and f"node {stranded_node} is Missing" in forced[0]
        status = job_status(local_cluster, job_namespace, "stranded")
        assert status["attempt"] == 2 and status["phase"] in ("Created", "Restarting")

        # Meanwhile `held`, whose node is Ready, was neither force-deleted nor moved on.
        assert events(local_cluster, job_namespace, "held", "ForceDeleted") == []
        labels = (pod(local_cluster, job_namespace, held) or {}).get("metadata", {}).get("labels", {})
        assert labels.get(contract.LABEL_ATTEMPT) == "1"
        assert job_status(local_cluster, job_namespace, "held")["phase"] == "Restarting"
    finally:
        local_cluster.kubectl("patch", "pod", held, "-n", job_namespace, "--type=merge",
                              "-p", '{"metadata":{"finalizers":null}}')
        local_cluster.kubectl("delete", "pod", held, "-n", job_namespace, "--grace-period=0", "--force",
                              "--wait=false")
