"""Messages the operator writes are bounded, and a status write the API server refuses is never
retried blindly. Real API server; the operator's own ServiceAccount token."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from lorakube import builders, kube, reconcile
from lorakube_dev import sandbox
from lorakube import status as st

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

MOUNTS = 64  # the CRD's maxItems for spec.resources.volumeMounts


def test_a_pod_rejected_with_a_huge_message_fails_the_job_with_a_bounded_one(local_cluster, job_namespace,
                                                                             start_operator, tmp_path):
    """The issue's reproduction was a 40,000-character toleration value; the schema now caps those,
    so the long rejection comes from something it still admits and only pod validation refuses:
    64 volume mounts (the CRD's maximum) whose 1020-character subPaths climb out with '..' (the
    schema bounds their length only; Kubernetes refuses '..' in a subPath). The API server lists
    every invalid subPath in full in one 422 message of about 70,000 characters, over the CRD's
    32768-character cap on a condition message. Before the fix the operator wrote that message as
    is, the API server refused the status write, and the job stayed Created with no pods while the
    operator retried every few seconds."""
    operator = start_operator()
    job = sandbox.quickstart_job(tmp_path, "long-refusal")
    mounts = job["spec"]["resources"]["volumeMounts"]
    for i in range(MOUNTS - len(mounts)):
        # Distinct values: the API server lists identical errors only once.
        sub_path = f"s{i:02d}" + "/.." * 339
        assert len(sub_path) <= 1024
        mounts.append({"name": "data", "mountPath": f"/m{i:02d}", "subPath": sub_path})
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)

    status = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, "long-refusal", 60)["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed" and c["status"] == "True")
    assert failed["reason"] == "InvalidSpec"
    message = failed["message"]
    assert len(message) <= st.MESSAGE_LIMIT
    assert message.startswith("the API server rejected pod(s) long-refusal-node-0")
    cut = re.search(r"\[\.\.\. (\d+) characters cut \.\.\.\]", message)
    assert cut and len(message) + int(cut.group(1)) > 32768, "the server's message was not that long"
    assert "must not contain '..'" in message

    # Not one status write was refused: no retry loop in the operator's log, no StatusRejected.
    log = operator.log_text()
    assert "refused the status" not in log and "retrying in" not in log, log[-3000:]


def test_a_status_write_the_server_refuses_fails_the_job_once_instead_of_looping(local_cluster, job_namespace,
                                                                                operator_kubeconfig, monkeypatch,
                                                                                tmp_path):
    """kube.act given a status patch the CRD refuses (a condition message over its 32768-character
    cap, which is what unbounded messages used to produce): the refusal is not raised into a retry
    loop; a small fallback status fails the job with StatusRejected and a bounded message."""
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, sandbox.quickstart_job(
        tmp_path, "refused", runPolicy={"suspend": True}))
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig))
    client = kube.Kube(kube.load_api_client())
    body = client.get_job(job_namespace, "refused")
    now = dt.datetime.now(dt.timezone.utc)
    obs = kube.observe(client, body, [], now)
    too_long = {"type": "Running", "status": "True", "reason": "AllPodsRunning", "message": "x" * 40_000,
                "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    refused = reconcile.Decision(status_patch={"phase": "Running", "conditions": [too_long]},
                                 create_pods=(builders.build_pod(obs.spec, obs.job, 1, 0, builders.OperatorConfig()),))

    outcome = kube.act(client, obs, refused)   # must not raise

    assert [e.reason for e in outcome.events] == ["StatusRejected"]
    assert all(len(e.message) <= st.EVENT_MESSAGE_LIMIT for e in outcome.events)
    status = client.get_job(job_namespace, "refused")["status"]
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StatusRejected" and len(failed["message"]) <= st.MESSAGE_LIMIT
    assert "Too long" in failed["message"] or "too long" in failed["message"], failed["message"]
    # The refused pass stopped before creating anything for the status it could not record.
    pods = local_cluster.kubectl("get", "pods", "-n", job_namespace, "-o", "json", check=True)
    assert json.loads(pods.stdout)["items"] == []
