"""Jobs that must not run as written, and suspend/resume, with the operator under its own token."""

from __future__ import annotations

import json

import pytest

from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


def failed_condition(status: dict) -> dict:
    return next(c for c in status["conditions"] if c["type"] == "Failed" and c["status"] == "True")


def pod_names(local_cluster, namespace: str, name: str) -> list[str]:
    result = local_cluster.kubectl("get", "pods", "-n", namespace, "-l", f"{contract.LABEL_JOB_NAME}={name}",
                                   "-o", "json", check=True)
    return [p["metadata"]["name"] for p in json.loads(result.stdout)["items"]]


def test_a_missing_service_account_fails_the_job_naming_the_field(local_cluster, job_namespace, data_dir,
                                                                  start_operator):
    start_operator()
    job = sandbox.quickstart_job(data_dir, "no-account", resources={"serviceAccountName": "nobody"})
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    status = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, "no-account", 60)["status"]
    condition = failed_condition(status)
    assert condition["reason"] == "InvalidSpec"
    assert "spec.resources.serviceAccountName" in condition["message"] and "nobody" in condition["message"]
    assert pod_names(local_cluster, job_namespace, "no-account") == []


def test_a_pod_the_api_server_rejects_fails_the_job_with_the_servers_words(local_cluster, job_namespace,
                                                                           data_dir, start_operator):
    start_operator()
    job = sandbox.quickstart_job(data_dir, "bad-mount")
    job["spec"]["resources"]["volumeMounts"].append({"name": "undeclared", "mountPath": "/scratch"})
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    status = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, "bad-mount", 60)["status"]
    condition = failed_condition(status)
    assert condition["reason"] == "InvalidSpec"
    assert "rejected" in condition["message"] and "undeclared" in condition["message"]
    assert pod_names(local_cluster, job_namespace, "bad-mount") == []


# slow: ~20 s; suspend is unit-tested in reconcile, and `make test-kueue` suspends and resumes jobs through Kueue
@pytest.mark.slow
def test_a_suspended_job_runs_nothing_until_resumed(local_cluster, job_namespace, data_dir, start_operator):
    start_operator()
    kubectl = local_cluster.cluster.kubectl
    job = sandbox.quickstart_job(data_dir, "later", runPolicy={"suspend": True})
    sandbox.apply_job(kubectl, job_namespace, job)

    def suspended():
        status = (sandbox.get_job(kubectl, job_namespace, "later") or {}).get("status") or {}
        return status if status.get("phase") == "Suspended" else None

    status = _wait(suspended, 60)
    assert pod_names(local_cluster, job_namespace, "later") == []
    assert any(c["type"] == "Suspended" and c["status"] == "True" for c in status["conditions"])

    local_cluster.kubectl("patch", "ltj", "later", "-n", job_namespace, "--type=merge",
                          "-p", '{"spec":{"runPolicy":{"suspend":false}}}', check=True)
    final = sandbox.follow(kubectl, job_namespace, "later", 600)["status"]
    assert final["phase"] == "Succeeded", json.dumps(final, indent=1)
    assert any(c["type"] == "Suspended" and c["status"] == "False" and c["reason"] == "Resumed"
               for c in final["conditions"])


def _wait(predicate, timeout: float):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s")
