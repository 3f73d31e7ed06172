"""What the operator asks of the API server, counted by the API server itself (its audit log): one
create per pod, one DELETE per pod in a gang restart; and how long deleting a live job takes.

A cluster of its own for this module: the apiserver records the operator's requests, and the
process node runs bench/noop_image (a `sleep` standing in for the trainer), so many jobs run at
once for the price of a few processes.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from localcluster import audit
from localcluster import kubeconfig as kubeconfig_mod
from localcluster.cluster import LocalCluster
from localcluster.node import NodeSpec
from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
OPERATOR_USER = f"system:serviceaccount:{sandbox.OPERATOR_NAMESPACE}:{sandbox.OPERATOR_SERVICE_ACCOUNT}"
# Kopf used to hold a deleted job's finalizer for 60 s when its timer was busy: any bound well
# under that catches it; this one leaves room for a loaded 2-core host.
DELETION_BOUND_SECONDS = 20.0


class NoopCluster:
    def __init__(self, cluster: LocalCluster, operator: sandbox.OperatorProcess) -> None:
        self.cluster = cluster
        self.operator = operator

    def kubectl(self, *args: str, input: str | None = None) -> str:
        result = self.cluster.kubectl(*args, input=input)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def namespace(self, name: str) -> str:
        self.kubectl("create", "namespace", name)
        deadline = time.monotonic() + 60
        while self.cluster.kubectl("get", "serviceaccount", "default", "-n", name).returncode != 0:
            assert time.monotonic() < deadline, f"namespace {name} got no default ServiceAccount"
            time.sleep(0.2)
        return name

    def create_jobs(self, namespace: str, names: list[str], pods: int, **run_policy: int) -> None:
        """All at once, as a burst of `kubectl create` (the situation that raced before)."""
        def create(name: str) -> None:
            self.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(job(name, pods, **run_policy)))
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(create, names))

    def pods(self, namespace: str) -> list[dict]:
        return json.loads(self.kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]

    def wait_running(self, namespace: str, count: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            phases = Counter(p.get("status", {}).get("phase") for p in self.pods(namespace))
            if phases["Running"] >= count:
                return
            assert time.monotonic() < deadline, f"only {dict(phases)} of {count} pods after {timeout:.0f} s"
            time.sleep(1.0)


def crash(cluster: LocalCluster, pod: dict) -> None:
    """SIGKILL a pod's trainer process (the process node records its pid): a crash, exit 137."""
    record = cluster.node_state_dir / "procs" / f"{pod['metadata']['uid']}_{contract.TRAINER_CONTAINER}.json"
    os.kill(int(json.loads(record.read_text())["pid"]), signal.SIGKILL)


def job(name: str, pods: int, **run_policy: int) -> dict:
    return {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"family": "flux", "uri": "/data/model"}, "dataset": {"uri": "/data/dataset"},
            "training": {"height": 64, "width": 64, "precision": "32", "strategy": "ddp"},
            "resources": {"numNodes": pods, "gpusPerNode": 0,
                          "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}},
            "output": {"uri": f"/data/output/{name}"},
            **({"runPolicy": run_policy} if run_policy else {}),
        },
    }


@pytest.fixture(scope="module")
def noop_cluster(tmp_path_factory) -> Iterator[NoopCluster]:
    work = tmp_path_factory.mktemp("api-cost")
    cluster = LocalCluster(work / "cluster", nodes=[NodeSpec("noopnode-0", cpu="100", memory="400Gi")],
                           log=lambda _: None, node_path=[REPO / "bench" / "noop_image"], node_env={},
                           audit_policy=audit.write_policy(work / "audit-policy.yaml", [OPERATOR_USER]))
    operator = None
    try:
        cluster.up()
        sandbox.install(cluster.kubectl, "api-cost-setup")
        token = sandbox.operator_token(cluster.kubectl)
        config = kubeconfig_mod.write_for_token(work / "operator.kubeconfig", cluster.server, cluster.ca_file,
                                                "lorakube-operator", token)
        # A timer every second: a deletion then usually meets a timer that is running a pass,
        # the case that used to hold the finalizer for Kopf's 60 s cancellation polling.
        operator = sandbox.OperatorProcess(config, work / "operator.log",
                                           env={"LORAKUBE_RECONCILE_INTERVAL_SECONDS": "1"}).start()
        yield NoopCluster(cluster, operator)
    finally:
        if operator is not None:
            operator.stop()
            print(f"--- operator log ---\n{operator.log_text()[-6000:]}")
        leftovers = cluster.down()
    assert not leftovers, leftovers


def test_each_pod_is_created_once_even_when_jobs_arrive_together(noop_cluster):
    namespace = noop_cluster.namespace("creates-once")
    names, pods = [f"burst-{index}" for index in range(6)], 3
    start = time.time()
    noop_cluster.create_jobs(namespace, names, pods)
    noop_cluster.wait_running(namespace, len(names) * pods)
    time.sleep(2.0)  # the passes the last pods' Running status started are done

    entries = [e for e in audit.requests(noop_cluster.cluster.layout.audit_log, OPERATOR_USER, start, time.time())
               if e.get("objectRef", {}).get("namespace") == namespace]
    creates = [e for e in entries if e["verb"] == "create" and e["objectRef"].get("resource") == "pods"]
    per_job = Counter(e["objectRef"]["name"].rsplit("-node-", 1)[0] for e in creates)
    codes = Counter(e["responseStatus"]["code"] for e in creates)
    assert per_job == {name: pods for name in names}, f"pod creates per job: {dict(per_job)}"
    assert codes == {201: len(names) * pods}, f"pod create answers: {dict(codes)}"
    # Every pod the operator made is one the apiserver counted once: no pod was made twice.
    made = Counter(p["metadata"]["name"] for p in noop_cluster.pods(namespace))
    assert sum(made.values()) == len(names) * pods and set(made.values()) == {1}


def test_deleting_live_jobs_takes_seconds(noop_cluster):
    namespace = noop_cluster.namespace("deletes-fast")
    names = [f"live-{index}" for index in range(8)]
    noop_cluster.create_jobs(namespace, names, 2)
    noop_cluster.wait_running(namespace, len(names) * 2)
    time.sleep(3.0)  # several timer ticks: each job's timer is running passes now

    asked = {}
    for name in names:
        asked[name] = time.monotonic()
        noop_cluster.kubectl("delete", contract.SHORT_NAME, name, "-n", namespace, "--wait=false")
    took: dict[str, float] = {}
    deadline = time.monotonic() + 3 * DELETION_BOUND_SECONDS
    while len(took) < len(names) and time.monotonic() < deadline:
        present = set(noop_cluster.kubectl("get", contract.SHORT_NAME, "-n", namespace,
                                           "-o", "jsonpath={.items[*].metadata.name}").split())
        for name in names:
            if name not in present and name not in took:
                took[name] = time.monotonic() - asked[name]
        time.sleep(0.25)
    slow = {name: round(took.get(name, float("inf")), 1) for name in names
            if took.get(name, float("inf")) > DELETION_BOUND_SECONDS}
    assert not slow, f"jobs still there {DELETION_BOUND_SECONDS:.0f} s after their deletion (seconds): {slow}"


# slow: ~20 s; the deletion cache is unit-tested (tests/unit/operator/test_expectations.py) and the rejected-gang path counts DELETEs against the real apiserver (tests/integration/test_operator_rejected_pods.py)
@pytest.mark.slow
def test_a_gang_restart_deletes_each_pod_once(noop_cluster):
    namespace = noop_cluster.namespace("deletes-once")
    names, pods = [f"crashy-{index}" for index in range(6)], 3
    noop_cluster.create_jobs(namespace, names, pods, maxRestarts=3, backoffSeconds=0)
    noop_cluster.wait_running(namespace, len(names) * pods)
    first = {p["metadata"]["uid"]: p["metadata"]["name"] for p in noop_cluster.pods(namespace)}
    start = time.time()
    # Rank 0 of every job crashes at once: six gang restarts, each deleting its three pods.
    for pod in noop_cluster.pods(namespace):
        if pod["metadata"]["name"].endswith("-node-0"):
            crash(noop_cluster.cluster, pod)
    deadline = time.monotonic() + 180
    while True:
        now = noop_cluster.pods(namespace)
        fresh = [p for p in now if p["metadata"]["uid"] not in first and p["status"].get("phase") == "Running"]
        if len(fresh) == len(names) * pods:
            break
        assert time.monotonic() < deadline, f"{len(fresh)} of {len(names) * pods} pods of the new gangs run"
        time.sleep(1.0)
    time.sleep(2.0)  # the passes the new pods' Running status started are done

    entries = [e for e in audit.requests(noop_cluster.cluster.layout.audit_log, OPERATOR_USER, start, time.time())
               if e.get("objectRef", {}).get("namespace") == namespace]
    deletes = Counter(e["objectRef"]["name"] for e in entries
                      if e["verb"] == "delete" and e["objectRef"].get("resource") == "pods")
    # Every pod of the first gangs was deleted by the operator, exactly once (the new gangs reuse
    # the names and are not deleted in this window).
    assert deletes == Counter(first.values()), f"DELETEs per pod: {dict(deletes)}"
    restarts = {name: json.loads(noop_cluster.kubectl("get", contract.SHORT_NAME, name, "-n", namespace,
                                                      "-o", "json"))["status"]["restarts"] for name in names}
    assert restarts == {name: 1 for name in names}
