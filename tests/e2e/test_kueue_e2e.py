"""Jobs queued in a real Kueue (built from its Go module, run against the local cluster): the gang
is admitted whole or not at all, waits `Queued` with Kueue's reason, and a preemption costs no
restart budget. `make test-kueue` runs these (they take minutes, so `make test` leaves them out).

The ClusterQueue's quota (cpu 1, memory 2Gi) fits exactly one quickstart job: 2 pods of 500m/1Gi.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from localcluster import kueue as kueue_mod
from localcluster.pytest_plugin import wait_for as cluster_wait_for
from lorakube import queueing
from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.kueue]

JOB_TIMEOUT = 600
QUOTA = {"cpu": "1", "memory": "2Gi"}


@pytest.fixture
def queue_namespace(local_cluster, kueue, new_namespace):
    """A namespace Kueue manages, with a LocalQueue `team` on a ClusterQueue of its own."""
    key, value = kueue_mod.MANAGED_LABEL
    local_cluster.kubectl("label", "namespace", new_namespace, f"{key}={value}", check=True)
    cluster_queue = f"cq-{uuid.uuid4().hex[:8]}"
    local_cluster.apply(kueue_mod.queue_objects(cluster_queue, "team", new_namespace, QUOTA))
    yield new_namespace
    local_cluster.kubectl("delete", "clusterqueue", cluster_queue, "--wait=false", check=False)


def queued_job(data_dir: Path, name: str, steps: int, priority: str | None = None) -> dict:
    job = sandbox.quickstart_job(data_dir, name, training={"stepsPerEpoch": steps, "checkpointEverySteps": 1},
                                 runPolicy={"backoffSeconds": 1})
    labels = {queueing.QUEUE_NAME_LABEL: "team"}
    if priority:
        labels[queueing.PRIORITY_CLASS_LABEL] = priority
    job["metadata"]["labels"] = labels
    return job


def job_status(local_cluster, namespace: str, name: str) -> dict:
    return (sandbox.get_job(local_cluster.cluster.kubectl, namespace, name) or {}).get("status") or {}


def pods_of(local_cluster, namespace: str, name: str) -> list[dict]:
    result = local_cluster.kubectl("get", "pods", "-n", namespace, "-l", f"{contract.LABEL_JOB_NAME}={name}",
                                   "-o", "json", check=True)
    return json.loads(result.stdout)["items"]


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def wait_for(predicate, timeout: float, what: str):
    return cluster_wait_for(what, predicate, timeout, every=0.5)


def test_the_second_job_stays_queued_until_the_first_finishes(local_cluster, queue_namespace, data_dir,
                                                              start_operator):
    start_operator()
    kubectl = local_cluster.cluster.kubectl
    for name in ("first", "second"):
        sandbox.apply_job(kubectl, queue_namespace, queued_job(data_dir, name, steps=4))

    def one_admitted():
        statuses = {n: job_status(local_cluster, queue_namespace, n) for n in ("first", "second")}
        running = [n for n, s in statuses.items() if s.get("phase") in ("Created", "Running")]
        queued = [n for n, s in statuses.items()
                  if s.get("phase") == "Queued" and condition(s, "Queued").get("reason") not in (None, "Submitted")]
        return (running[0], queued[0], statuses[queued[0]]) if running and queued else None

    admitted, waiting, waiting_status = wait_for(one_admitted, 180, "one job admitted, the other queued")
    queued = condition(waiting_status, "Queued")
    # Kueue's own words: the workload waits for quota.
    assert queued["reason"] == "Pending", queued
    assert "insufficient" in queued["message"] and f"workload {waiting}-1" in queued["message"], queued

    # While any pod of the admitted job has not ended, no pod of the waiting one gets past Kueue's
    # gate: the quota is held by the whole running gang.
    checks = 0
    while any(p["status"].get("phase") not in ("Succeeded", "Failed")
              for p in pods_of(local_cluster, queue_namespace, admitted)):
        pods = pods_of(local_cluster, queue_namespace, waiting)
        assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
        gates = [[g["name"] for g in p["spec"].get("schedulingGates") or []] for p in pods]
        assert all(queueing.ADMISSION_GATE in names for names in gates), gates
        assert not any(p["spec"].get("nodeName") for p in pods)
        checks += 1
        time.sleep(1)
    assert checks > 0
    first_done = sandbox.follow(kubectl, queue_namespace, admitted, 60)["status"]
    assert first_done["phase"] == "Succeeded", json.dumps(first_done, indent=1)

    # Finishing released the quota at once: the admitted job's workload is Finished.
    workload = local_cluster.get_json("workload", f"{admitted}-1", namespace=queue_namespace)
    assert any(c["type"] == "Finished" and c["status"] == "True" for c in workload["status"]["conditions"])

    final = sandbox.follow(kubectl, queue_namespace, waiting, JOB_TIMEOUT)["status"]
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert final["attempt"] == 1 and final["restarts"] == 0
    assert condition(final, "Created")["reason"] == "Admitted"
    assert condition(final, "Queued")["status"] == "False"


def test_a_higher_priority_job_preempts_and_the_lower_one_resumes_without_spending_restarts(
        local_cluster, queue_namespace, data_dir, start_operator):
    start_operator()
    kubectl = local_cluster.cluster.kubectl
    local_cluster.apply([
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass",
         "metadata": {"name": name}, "value": value, "description": f"{name} priority"}
        for name, value in (("lorakube-e2e-low", 100), ("lorakube-e2e-high", 1000))])
    sandbox.apply_job(kubectl, queue_namespace, queued_job(data_dir, "low", steps=40, priority="lorakube-e2e-low"))

    def checkpointed():
        status = job_status(local_cluster, queue_namespace, "low")
        step = ((status.get("progress") or {}).get("step") or 0)
        return status if status.get("phase") == "Running" and step >= 3 else None

    wait_for(checkpointed, 300, "the low-priority job running past a checkpoint")
    sandbox.apply_job(kubectl, queue_namespace, queued_job(data_dir, "high", steps=4, priority="lorakube-e2e-high"))

    def requeued():
        status = job_status(local_cluster, queue_namespace, "low")
        return status if status.get("attempt", 1) >= 2 and status.get("phase") == "Queued" else None

    low = wait_for(requeued, 180, "the low-priority job preempted and queued again")
    assert low["disruptions"] == 1 and low["restarts"] == 0
    # Kueue's stop of the gang is recorded as a disruption, and the new attempt waits in the queue.
    assert low["lastFailure"]["reason"] == "PodDisrupted", low["lastFailure"]
    assert condition(low, "Queued")["status"] == "True"
    interrupted = low["progress"]["step"]

    high = sandbox.follow(kubectl, queue_namespace, "high", JOB_TIMEOUT)["status"]
    assert high["phase"] == "Succeeded", json.dumps(high, indent=1)

    final = sandbox.follow(kubectl, queue_namespace, "low", JOB_TIMEOUT)["status"]
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert final["restarts"] == 0 and final["disruptions"] == 1 and final["attempt"] == 2
    assert final["progress"]["step"] == final["progress"]["totalSteps"] == 40
    # The second attempt resumed from the checkpoint the first one wrote, not from step 0.
    log = local_cluster.kubectl("logs", "low-node-0", "-n", queue_namespace, check=True).stdout
    resumed = [line for line in log.splitlines() if "resuming from" in line]
    assert resumed, log[-3000:]
    step = int(resumed[0].split("(step ")[1].split(" ")[0])
    # A checkpoint is written every step; the last progress report before the preemption may lag
    # the trainer by a step or more, never lead it.
    assert interrupted - 1 <= step < 40, (resumed, interrupted)


def test_the_example_queue_is_accepted_by_kueue(local_cluster, kueue, new_namespace):
    # examples/kueue/queue.yaml through Kueue's own validating and defaulting webhooks.
    example = Path(__file__).resolve().parents[2] / "examples" / "kueue" / "queue.yaml"
    result = local_cluster.kubectl("apply", "--dry-run=server", "-n", new_namespace, "-f", str(example))
    assert result.returncode == 0, result.stderr
    assert "clusterqueue.kueue.x-k8s.io/lora-training created (server dry run)" in result.stdout
