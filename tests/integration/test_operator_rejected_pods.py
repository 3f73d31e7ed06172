"""A pod the API server rejects fails the job; the pods of the same gang already created are
deleted once. Those deletions are remembered like a gang restart's (kube.Expectations), so the
failed job's next pass, which often starts before the pod watch has shown them, sends no second
DELETE. Before the fix that pass saw the created pods as alive and deleted them again.

Against the real kube-apiserver: a ValidatingAdmissionPolicy refuses rank 1's pod only, so in one
pass rank 0's create succeeds and rank 1's is rejected. The passes run in this process
(kube.reconcile_job, as the operator's handlers call it) with the operator's own RBAC, fed the pod
index as a watch that has not caught up yet shows it: empty. Every request the client sends is
counted on its way out.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
import yaml

from lorakube import builders, kube
from lorakube_api import contract

pytestmark = pytest.mark.cluster

REFUSED = "rank 1 is refused by this test's admission policy"


def policy(name: str, namespace: str) -> list[dict]:
    rank = contract.LABEL_RANK
    return [{
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                    "operations": ["CREATE"], "resources": ["pods"]}]},
            "validations": [{"expression": f"!has(object.metadata.labels) || "
                                           f"!('{rank}' in object.metadata.labels) || "
                                           f"object.metadata.labels['{rank}'] != '1'",
                             "message": REFUSED}],
        },
    }, {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {
                     "matchLabels": {"kubernetes.io/metadata.name": namespace}}}},
    }]


def probe_pod(rank: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"probe-{rank}", "labels": {contract.LABEL_RANK: str(rank)}},
            "spec": {"containers": [{"name": "c", "image": "lorakube/none:never"}]}}


def job(name: str) -> dict:
    return {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"family": "flux", "uri": "/data/model"}, "dataset": {"uri": "/data/dataset"},
            "training": {"height": 64, "width": 64, "precision": "32", "strategy": "ddp"},
            # Never scheduled: only the API objects matter here.
            "resources": {"numNodes": 2, "gpusPerNode": 0, "nodeSelector": {"lorakube.io/test": "nowhere"},
                          "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}},
            "output": {"uri": f"/data/output/{name}"},
        },
    }


def test_the_pods_created_before_a_rejection_are_deleted_once(local_cluster, operator_kubeconfig, new_namespace,
                                                              monkeypatch):
    name = f"reject-rank-1-{new_namespace}"[:63]
    local_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(policy(name, new_namespace)), check=True)
    try:
        # The policy is compiled after it is stored: wait until a dry run of rank 1 is refused.
        deadline = time.monotonic() + 30
        while True:
            dry = local_cluster.kubectl("create", "--dry-run=server", "-n", new_namespace, "-f", "-",
                                        input=yaml.safe_dump(probe_pod(1)))
            if dry.returncode != 0 and REFUSED in dry.stderr:
                break
            assert time.monotonic() < deadline, f"the admission policy never refused rank 1: {dry.stderr}"
            time.sleep(0.3)
        assert local_cluster.kubectl("create", "--dry-run=server", "-n", new_namespace, "-f", "-",
                                     input=yaml.safe_dump(probe_pod(0))).returncode == 0

        local_cluster.kubectl("create", "-n", new_namespace, "-f", "-", input=yaml.safe_dump(job("gang")),
                              check=True)
        monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig))
        api = kube.load_api_client()
        sent: list[tuple[str, str]] = []
        request = api.request

        def counted(method: str, url: str, *args, **kwargs):
            sent.append((method.upper(), url))
            return request(method, url, *args, **kwargs)

        api.request = counted
        client = kube.Kube(api)
        config = builders.OperatorConfig()

        def reconcile() -> None:
            now = dt.datetime.now(dt.timezone.utc)
            kube.reconcile_job(client, new_namespace, "gang", (), config, now)

        reconcile()
        status = json.loads(local_cluster.kubectl("get", contract.SHORT_NAME, "gang", "-n", new_namespace,
                                                  "-o", "json", check=True).stdout)["status"]
        assert status["phase"] == "Failed", status
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidSpec" and REFUSED in failed["message"], failed
        pod_urls = [url for method, url in sent if method == "POST" and url.endswith("/pods")]
        assert len(pod_urls) == 2, sent      # both ranks were asked for; rank 0's was made
        deletes = [url for method, url in sent if method == "DELETE" and "/pods/" in url]
        assert [url.rsplit("/", 1)[-1].split("?")[0] for url in deletes] == [contract.pod_name("gang", 0)], sent

        # The next passes of the failed job, before the watch shows rank 0's deletion: no DELETE.
        sent.clear()
        reconcile()
        reconcile()
        again = [url for method, url in sent if method == "DELETE"]
        assert again == [], f"rank 0 was deleted again: {sent}"
        left = json.loads(local_cluster.kubectl("get", "pods", "-n", new_namespace, "-o", "json",
                                                check=True).stdout)["items"]
        assert [p["metadata"]["name"] for p in left if not p["metadata"].get("deletionTimestamp")] == []
    finally:
        local_cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name,
                              "--ignore-not-found")
