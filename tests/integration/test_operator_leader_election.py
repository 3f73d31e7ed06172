"""Two operator replicas on the real API server: only one holds the Lease and acts at a time.

Expiry is judged on each replica's own monotonic clock; a leader paused long enough for another
replica to take over must not act when it resumes.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from lorakube import kube, leader
from lorakube_api import contract
from lorakube_dev import sandbox
from localcluster.pytest_plugin import wait_for

pytestmark = pytest.mark.cluster

# Short times so the test stays fast; the same rules as the defaults (15 s, 10 s, 2 s).
LEASE = ["--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5"]


def test_only_one_replica_leads_and_a_follower_takes_over_an_expired_lease(local_cluster, new_namespace,
                                                                            monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(local_cluster.kubeconfig))
    times = leader.LeaseTimes(duration_seconds=2, renew_deadline_seconds=1.5, retry_seconds=0.2)
    first = leader.LeaderElector(kube.load_api_client(), new_namespace, "replica-a", times)
    second = leader.LeaderElector(kube.load_api_client(), new_namespace, "replica-b", times)

    assert first.try_claim()
    assert first.leadership.valid()
    assert not second.try_claim()
    assert first.try_claim()  # renewing its own lease

    stop, lost = threading.Event(), threading.Event()
    renewer = threading.Thread(target=first.keep_renewing, args=(stop, lost), daemon=True)
    renewer.start()
    time.sleep(times.duration_seconds + 1)
    assert not second.try_claim(), "the lease was taken although its holder kept renewing it"
    assert first.leadership.valid()

    stop.set()
    renewer.join(timeout=5)
    started = time.monotonic()
    assert second.wait_until_leader(threading.Event())
    waited = time.monotonic() - started
    assert times.renew_deadline_seconds < waited < times.duration_seconds + 2
    assert not first.leadership.valid(), "the old leader's deadline must pass before anyone takes over"
    lease = local_cluster.get_json("lease", leader.LEASE_NAME, namespace=new_namespace)
    assert lease["spec"]["holderIdentity"] == "replica-b"
    assert lease["spec"]["leaseTransitions"] == 1
    assert not lost.is_set()

    # a clean exit hands the lease over at once
    second.release()
    assert first.try_claim()


# --- two real `lorakube operator --leader-elect` processes ---------------------------------------


@pytest.fixture
def job_namespaces(local_cluster) -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        namespace = local_cluster.create_namespace()
        made.append(namespace)
        return namespace

    yield make
    for namespace in made:
        local_cluster.delete_namespace(namespace)

def lease_holder(local_cluster) -> str | None:
    result = local_cluster.kubectl("get", "lease", leader.LEASE_NAME, "-n", sandbox.OPERATOR_NAMESPACE,
                                   "-o", "jsonpath={.spec.holderIdentity}")
    return result.stdout.strip() if result.returncode == 0 else None


def pods_of(local_cluster, namespace: str, job: str) -> list[dict]:
    result = local_cluster.kubectl("get", "pods", "-n", namespace, "-l", f"{contract.LABEL_JOB_NAME}={job}",
                                   "-o", "json", check=True)
    return json.loads(result.stdout)["items"]


# slow: ~16 s; `make test` keeps a follower taking over an expired lease
@pytest.mark.slow
def test_a_paused_leader_is_replaced_and_does_not_act_when_it_resumes(local_cluster, operator_kubeconfig,
                                                                     lease_reset, job_namespaces, tmp_path):
    both, only_a = job_namespaces(), job_namespaces()

    def replica(identity: str, scope: list[str]) -> sandbox.OperatorProcess:
        env = {"POD_NAME": identity, "LORAKUBE_OPERATOR_NAMESPACE": sandbox.OPERATOR_NAMESPACE,
               "LORAKUBE_RECONCILE_INTERVAL_SECONDS": "1"}
        return sandbox.OperatorProcess(operator_kubeconfig, tmp_path / f"{identity}.log", env=env,
                                       args=[*scope, "--leader-elect", *LEASE])

    def job(namespace: str, name: str) -> None:
        # Pods that never schedule: the test is about who writes, not about training.
        body = sandbox.quickstart_job(tmp_path, name=name,
                                      resources={"nodeSelector": {"lorakube.io/test": "nowhere"}})
        sandbox.apply_job(local_cluster.cluster.kubectl, namespace, body)

    a = replica("replica-a", ["--all-namespaces"])
    b = replica("replica-b", ["--namespace", both])  # b never sees `only_a`
    try:
        a.start()
        wait_for("replica-a to take the lease", lambda: lease_holder(local_cluster) == "replica-a")
        job(both, "first")
        wait_for("replica-a to create the pods of `first`", lambda: pods_of(local_cluster, both, "first"))

        b.start()
        wait_for("replica-b to wait for the lease", lambda: "waiting for the lease" in b.log_text())
        time.sleep(2)  # b keeps seeing a's renewals: no takeover while the leader renews
        assert lease_holder(local_cluster) == "replica-a" and b.running

        a.process.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        wait_for("replica-b to take over", lambda: lease_holder(local_cluster) == "replica-b")
        took_over = time.monotonic() - paused
        # Not before a's renew deadline (3 s after its last renewal, at most 0.5 s before the pause)
        assert took_over > 2.5, f"took over {took_over:.1f} s after the pause"

        job(both, "second")
        created = wait_for("replica-b to create the pods of `second`", lambda: pods_of(local_cluster, both, "second"))
        assert len(created) == 2
        # A job only the paused replica watches: whatever a resumed a did would show on it.
        job(only_a, "third")
        time.sleep(1)  # its ADDED event now waits in a's watch connection
        log_before_resume = len(a.log_text())

        a.process.send_signal(signal.SIGCONT)
        exit_code = a.process.wait(timeout=10)
        after_resume = a.log_text()[log_before_resume:]
        assert exit_code == 1, after_resume
        assert "lost the leader lease" in after_resume
        # No Event of any job was logged (the Reconciler logs each Event it posts); a refused
        # pass says so instead.
        refusals = ("not reconciling", "stopped reconciling", "not posting")
        acted = [line for line in after_resume.splitlines()
                 if any(f"/{name}: " in line for name in ("first", "second", "third"))
                 and not any(refusal in line for refusal in refusals)]
        assert not acted, acted

        time.sleep(3)  # b's next passes; a is gone
        third = json.loads(local_cluster.kubectl("get", contract.SHORT_NAME, "third", "-n", only_a, "-o", "json",
                                                 check=True).stdout)
        assert not third.get("status"), f"the resumed old leader wrote a status: {third.get('status')}"
        assert not third["metadata"].get("finalizers"), "the resumed old leader added its finalizer"
        assert not [k for k in third["metadata"].get("annotations") or {} if k.startswith(contract.API_GROUP)]
        assert pods_of(local_cluster, only_a, "third") == []
        assert lease_holder(local_cluster) == "replica-b" and b.running
        lease = local_cluster.get_json("lease", leader.LEASE_NAME, namespace=sandbox.OPERATOR_NAMESPACE)
        assert lease["spec"]["leaseTransitions"] >= 1
    finally:
        if a.running:
            a.process.send_signal(signal.SIGCONT)
        a.stop()
        b.stop()
        for proc in (a, b):
            print(f"--- {proc.log_path.name} ---\n{proc.log_text()[-4000:]}")
