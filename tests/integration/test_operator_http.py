"""Two `lorakube operator --leader-elect` replicas on the real API server: both answer /healthz,
/readyz and /metrics (a Deployment of 2 replicas must become Available with both Ready, and a
follower must not fail its liveness probe), and the leader gauge says which one acts."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from lorakube import leader
from lorakube_dev import sandbox
from localcluster.pytest_plugin import wait_for

pytestmark = pytest.mark.cluster

LEASE = ["--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5"]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:          # not listening yet
        return 0, str(exc)


def leader_gauge(process: sandbox.OperatorProcess) -> str | None:
    status, body = get(f"{process.http_url}/metrics")
    lines = [line for line in body.splitlines() if line.startswith("lorakube_leader ")]
    return lines[0].split()[1] if status == 200 and lines else None


def test_both_replicas_answer_probes_and_the_leader_gauge_follows_the_lease(local_cluster, operator_kubeconfig,
                                                                             lease_reset, tmp_path):
    def replica(identity: str) -> sandbox.OperatorProcess:
        env = {"POD_NAME": identity, "LORAKUBE_OPERATOR_NAMESPACE": sandbox.OPERATOR_NAMESPACE}
        return sandbox.OperatorProcess(operator_kubeconfig, tmp_path / f"{identity}.log", env=env,
                                       args=["--all-namespaces", "--leader-elect", *LEASE])

    def holder() -> str | None:
        result = local_cluster.kubectl("get", "lease", leader.LEASE_NAME, "-n", sandbox.OPERATOR_NAMESPACE,
                                       "-o", "jsonpath={.spec.holderIdentity}")
        return result.stdout.strip() if result.returncode == 0 else None

    a, b = replica("replica-a"), replica("replica-b")
    try:
        a.start()
        wait_for("replica-a to lead", lambda: holder() == "replica-a")
        b.start()
        for process in (a, b):
            wait_for(f"{process.log_path.stem} to be ready", lambda: get(f"{process.http_url}/readyz")[0] == 200)
        status, body = get(f"{a.http_url}/healthz")
        assert status == 200 and body.startswith("leader: Kopf's event loop"), body
        status, body = get(f"{b.http_url}/healthz")
        assert status == 200 and body.startswith("follower: the lease loop"), body
        assert get(f"{b.http_url}/readyz") == (200, "follower: reached the API server\n")
        assert leader_gauge(a) == "1.0" and leader_gauge(b) == "0.0"

        a.stop()          # a clean exit releases the lease: b takes over at once
        assert a.process.returncode == 0
        wait_for("replica-b to lead", lambda: holder() == "replica-b", timeout=20)
        wait_for("replica-b's /healthz to say it leads",
                 lambda: get(f"{b.http_url}/healthz")[1].startswith("leader:"))
        assert get(f"{b.http_url}/healthz")[0] == 200
        assert leader_gauge(b) == "1.0"
        assert get(f"{a.http_url}/healthz")[0] == 0, "a stopped replica's server is gone"
    finally:
        for process in (a, b):
            process.stop()
            print(f"--- {process.log_path.name} ---\n{process.log_text()[-3000:]}")
