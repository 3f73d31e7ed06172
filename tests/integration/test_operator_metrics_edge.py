"""The operator's counters at the edge that really talks to the API server: pods created (an
adopted pod is not counted again), a gang restart counted once its status is written, and the
pods that restart deleted. Pods never schedule here: the test drives reconcile passes itself and
plays the kubelet by writing a pod's failed status, as the process node would."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from prometheus_client import CollectorRegistry

from lorakube import builders, kube, pods
from lorakube.metrics import OperatorMetrics
from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = pytest.mark.cluster

CONFIG = builders.OperatorConfig(trainer_image="example/trainer:1")


def count(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_pods_restarts_and_phases_are_counted_where_the_api_answers(local_cluster, new_namespace, tmp_path,
                                                                  monkeypatch):
    sandbox.install(local_cluster.cluster.kubectl, "lorakube-e2e-setup")
    monkeypatch.setenv("KUBECONFIG", str(local_cluster.kubeconfig))
    metrics = OperatorMetrics(CollectorRegistry())
    client = kube.Kube(kube.load_api_client(), metrics)
    job = sandbox.quickstart_job(tmp_path, "counted", resources={"nodeSelector": {"lorakube.io/test": "nowhere"}})
    sandbox.apply_job(local_cluster.cluster.kubectl, new_namespace, job)

    def views() -> list[pods.PodView]:
        items = json.loads(local_cluster.kubectl("get", "pods", "-n", new_namespace, "-o", "json", check=True).stdout)
        return [view for view in map(pods.from_body, items["items"]) if view is not None]

    def reconcile(observed: list[pods.PodView]) -> kube.Outcome:
        return kube.reconcile_job(client, new_namespace, "counted", observed, CONFIG, dt.datetime.now(dt.timezone.utc))

    assert reconcile([]).phase == "Created"
    assert count(metrics, "lorakube_pods_created_total", namespace=new_namespace) == 2
    # A pass whose pod index does not show the pods yet counts them as created (the client's
    # expectations): no second create, nothing counted twice.
    reconcile([])
    assert count(metrics, "lorakube_pods_created_total", namespace=new_namespace) == 2
    assert len(views()) == 2

    # Rank 1 fails with the retryable exit code, as its kubelet would report it.
    failed = {"status": {"phase": "Failed", "containerStatuses": [{
        "name": contract.TRAINER_CONTAINER, "image": "example/trainer:1", "imageID": "", "ready": False,
        "restartCount": 0, "state": {"terminated": {"exitCode": contract.EXIT_RETRYABLE, "reason": "Error"}}}]}}
    local_cluster.kubectl("patch", "pod", contract.pod_name("counted", 1), "-n", new_namespace, "--subresource",
                          "status", "--type", "merge", "-p", json.dumps(failed), check=True)
    outcome = reconcile(views())
    assert outcome.phase == "Restarting"
    assert count(metrics, "lorakube_gang_restarts_total", reason="RetryableExit") == 1
    assert count(metrics, "lorakube_gang_restarts_total", reason="KilledBySignal") == 0
    assert count(metrics, "lorakube_pods_deleted_total", namespace=new_namespace) == 2
    body = sandbox.get_job(local_cluster.cluster.kubectl, new_namespace, "counted")
    assert body["status"]["attempt"] == 2 and body["status"]["restarts"] == 1

    # The next pass reads the written status: the same failure is not counted twice, and deleting
    # a pod that is already gone is not a deletion.
    reconcile(views())
    assert count(metrics, "lorakube_gang_restarts_total", reason="RetryableExit") == 1
    assert client.delete_pod(new_namespace, contract.pod_name("counted", 0)) is False
    assert count(metrics, "lorakube_pods_deleted_total", namespace=new_namespace) == 2
