"""Kubeflow's training-operator (the operator benchmark's peer) runs on the local cluster: built
from its Go module, its PyTorchJob CRD installed, its controller creating a job's pods, which the
process node runs. Marker `training_operator` (`make test-training-operator`): the first build
takes minutes.
"""

from __future__ import annotations

from typing import Any

import pytest

from localcluster.pytest_plugin import wait_for
from localcluster.training_operator import pytorchjob_manifest

pytestmark = pytest.mark.cluster


def test_pytorchjob_with_two_workers_gets_its_pods_created_and_run(
        local_cluster: Any, new_namespace: str, training_operator: Any) -> None:
    job = pytorchjob_manifest("peer", new_namespace, workers=2, image="busybox",
                              command=["sh", "-c", "echo nodes: $PET_NNODES; sleep 3600"])
    local_cluster.apply(job)

    def pods() -> list[dict[str, Any]]:
        return local_cluster.get_json(
            "pods", "-l", "training.kubeflow.org/job-name=peer", namespace=new_namespace)["items"]

    created = wait_for("the PyTorchJob's 2 worker pods", lambda: len(pods()) == 2 and pods(),
                       timeout=90)
    assert sorted(p["metadata"]["name"] for p in created) == ["peer-worker-0", "peer-worker-1"]
    owner = created[0]["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("PyTorchJob", "peer")

    wait_for("both workers Running on the process node",
             lambda: [p["status"].get("phase") for p in pods()] == ["Running", "Running"],
             timeout=90)
    logs = local_cluster.kubectl("logs", "peer-worker-1", "-n", new_namespace, check=True).stdout
    assert "nodes: 2" in logs  # the controller's env (torchrun's node count) reached the process
    wait_for("the PyTorchJob's Running condition", lambda: any(
        c["type"] == "Running" and c["status"] == "True"
        for c in local_cluster.get_json("pytorchjob", "peer", namespace=new_namespace)
        .get("status", {}).get("conditions", [])), timeout=60)
