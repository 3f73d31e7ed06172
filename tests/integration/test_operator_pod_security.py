"""The pods the operator builds pass Pod Security `restricted` on the real API server."""

from __future__ import annotations

import copy

import pytest
import yaml

from lorakube import builders, rbac
from lorakube.spec import JobRef, parse_job

pytestmark = pytest.mark.cluster

SPEC = {
    "model": {"family": "flux", "uri": "/data/model"},
    "dataset": {"uri": "/data/dataset"},
    "output": {"uri": "/data/output/job"},
    "training": {"height": 64, "width": 64},
    "resources": {
        "numNodes": 2, "gpusPerNode": 1,
        # restricted forbids hostPath; a claim is the production-shaped volume.
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "lora-shared"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    },
}


def _dry_run_create(local_cluster, namespace: str, manifest: dict):
    return local_cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                                 input=yaml.safe_dump(manifest))


def test_built_pods_are_admitted_under_restricted_and_a_weakened_one_is_not(local_cluster):
    namespace = local_cluster.create_namespace(labels={
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
    })
    try:
        job = JobRef(name="psa-check", namespace=namespace, uid="7d1c6a2e-0000-4000-8000-000000000001")
        # The job's own account, which the operator creates before the pods (lorakube.rbac).
        local_cluster.kubectl("create", "serviceaccount", rbac.trainer_account_name(job.name), "-n", namespace,
                              check=True)
        for rank in (0, 1):
            pod = builders.build_pod(parse_job(job.name, SPEC), job, 1, rank, builders.OperatorConfig())
            admitted = _dry_run_create(local_cluster, namespace, pod)
            assert admitted.returncode == 0, admitted.stderr
            assert "violate" not in admitted.stderr  # no PodSecurity warning either

        weakened = copy.deepcopy(pod)
        del weakened["spec"]["containers"][0]["securityContext"]["capabilities"]
        rejected = _dry_run_create(local_cluster, namespace, weakened)
        assert rejected.returncode != 0
        assert "violates PodSecurity" in rejected.stderr and "capabilities" in rejected.stderr
    finally:
        local_cluster.delete_namespace(namespace)
