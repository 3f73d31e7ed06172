"""charts/lorakube renders, lints and is accepted by the real API server, for the default values and
for the other shapes it supports; values the schema refuses are refused with the key named."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from chart_helpers import CHART, MONITORING_API, by_kind, helm, one, render, set_args
from lorakube_dev import sync_crd

pytestmark = pytest.mark.cluster

NON_DEFAULT = {
    "watch": {"namespaces": ["chart-team-a", "chart-team-b"]},
    "crds": {"install": False},
    "replicaCount": 3,
    "podAntiAffinityPreset": "hard",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "imagePullSecrets": [{"name": "registry"}],
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "podDisruptionBudget": {"maxUnavailable": "50%"},
    "leaderElection": {"leaseDurationSeconds": 4, "renewDeadlineSeconds": 3, "retryPeriodSeconds": 0.5},
    "tests": {"job": {"modelUri": "/models/tiny-flux", "datasetUri": "/data/set",
                      "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
                      "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]}},
}


# --- helm alone ------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_helm_lint_strict_passes(local_cluster, values):
    result = helm(local_cluster, "lint", "--strict", str(CHART), *set_args(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_default_render(local_cluster):
    docs = render(local_cluster)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted([
        "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
        "ClusterRole", "ClusterRole", "Deployment", "PodDisruptionBudget", "Service",
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
        # helm test hooks
        "ServiceAccount", "Role", "RoleBinding", "Pod"]), kinds
    crd = one(docs, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    source = yaml.safe_load(sync_crd.SOURCE.read_text())
    crd["metadata"].pop("annotations")
    assert crd == source, "the rendered CRD differs from crds/"

    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["lorakube", "operator"]
    assert container["args"][:2] == ["--leader-elect", "--all-namespaces"]
    assert container["args"][container["args"].index("--http-address") + 1] == "0.0.0.0:8080"
    env = {item["name"]: item for item in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["LORAKUBE_OPERATOR_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["securityContext"]["runAsUser"] == 10002 and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == "lorakube-operator"
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "http-metrics", "port": 8080, "targetPort": "http-metrics",
                                         "protocol": "TCP"}]
    assert not by_kind(docs, "ServiceMonitor")
    aggregated = {doc["metadata"]["name"]: doc for doc in by_kind(docs, "ClusterRole")
                  if any(k.startswith("rbac.authorization.k8s.io/aggregate-to") for k in doc["metadata"]["labels"])}
    assert set(aggregated) == {"lorakube-edit", "lorakube-view"}
    assert set(aggregated["lorakube-view"]["rules"][0]["verbs"]) == {"get", "list", "watch"}
    assert {"create", "update", "delete", "get", "list", "watch"} <= set(aggregated["lorakube-edit"]["rules"][0]["verbs"])
    # Without a model and a dataset, `helm test` fails and says which values to set (no job).
    assert not by_kind(docs, "LoRATrainingJob")
    (hook,) = [pod for pod in by_kind(docs, "Pod") if pod["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    assert "tests.job.modelUri and tests.job.datasetUri" in " ".join(hook["spec"]["containers"][0]["command"])


def test_non_default_render(local_cluster):
    docs = render(local_cluster, NON_DEFAULT, "--api-versions", MONITORING_API)
    assert not by_kind(docs, "CustomResourceDefinition")
    # One Role + RoleBinding per watched namespace, the Lease Role in the release namespace, and
    # only `get nodes` cluster-wide.
    roles = {(doc["metadata"]["namespace"], doc["metadata"]["name"]) for doc in by_kind(docs, "Role")}
    assert roles == {("chart-team-a", "lorakube-operator"), ("chart-team-b", "lorakube-operator"),
                     ("lorakube-system", "lorakube-leader-election"), ("chart-team-a", "lorakube-test")}
    nodes = one(docs, "ClusterRole", "lorakube-operator-nodes")
    assert nodes["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    deployment = one(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:5] == ["--leader-elect", "--namespace", "chart-team-a", "--namespace", "chart-team-b"]
    assert args[args.index("--lease-duration"):args.index("--http-address")] == [
        "--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5"]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "requiredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["podAntiAffinity"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "http-metrics"
    # The test job lands in a watched namespace, with the given volumes.
    (hook,) = by_kind(docs, "Pod")
    assert hook["spec"]["containers"][0]["command"] == [
        "lorakube", "wait-job", "lorakube-test", "--namespace", "chart-team-a", "--timeout", "600"]
    test_job = one(docs, "LoRATrainingJob")
    assert test_job["metadata"]["namespace"] == "chart-team-a"
    assert test_job["spec"]["model"]["uri"] == "/models/tiny-flux"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in test_job["spec"]["resources"]["volumeMounts"]
    # Without the API, no ServiceMonitor even when enabled.
    assert not by_kind(render(local_cluster, NON_DEFAULT), "ServiceMonitor")


def test_the_charts_trainer_status_policy_is_the_manifests(local_cluster):
    docs = render(local_cluster)
    manifest = [d for d in yaml.safe_load_all((sync_crd.REPO_ROOT / "operator" / "lorakube" / "manifests" /
                                               "trainer-status-policy.yaml").read_text()) if d]
    policy = one(docs, "ValidatingAdmissionPolicy")
    assert policy["spec"] == one(manifest, "ValidatingAdmissionPolicy")["spec"]
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}


@pytest.mark.parametrize("values, named", [
    ({"image": {"repo": "x"}}, "at '/image': additional properties 'repo' not allowed"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"watch": {"namespaces": "team-a"}}, "at '/watch/namespaces': got string, want array"),
    ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
    ({"watch": {"namespaces": ["Team_A"]}}, "at '/watch/namespaces/0'"),
    ({"metrics": {"serviceMonitor": {"enabeld": True}}}, "at '/metrics/serviceMonitor': additional properties 'enabeld'"),
    ({"tests": {"job": {"family": "sdxl"}}}, "at '/tests/job/family'"),
], ids=["unknown-nested", "unknown-top", "wrong-type-list", "wrong-type-int", "bad-namespace", "typo-deep", "enum"])
def test_values_the_schema_refuses_are_refused_with_the_key_named(local_cluster, values, named):
    result = helm(local_cluster, "template", "lorakube", str(CHART), *set_args(values), check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr, result.stderr


# --- on the API server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dry_run_namespaces(local_cluster):
    """The release namespace (Pod Security restricted enforced) and the watched ones; the CRD and a
    ServiceMonitor CRD installed for real, so objects of those kinds can be dry-run."""
    release = local_cluster.create_namespace(labels={"pod-security.kubernetes.io/enforce": "restricted"})
    watched = [local_cluster.create_namespace(name) for name in NON_DEFAULT["watch"]["namespaces"]]
    local_cluster.kubectl("apply", "--server-side", "-f", str(sync_crd.SOURCE), check=True)
    local_cluster.apply(SERVICE_MONITOR_CRD)
    deadline = time.monotonic() + 60
    while (local_cluster.kubectl("get", "ltj", "-A").returncode != 0
           or local_cluster.kubectl("get", "servicemonitors", "-A").returncode != 0):
        assert time.monotonic() < deadline, "the CRDs are not served after 60 s"
        time.sleep(0.3)
    yield release
    for namespace in [release, *watched]:
        local_cluster.delete_namespace(namespace)
    local_cluster.kubectl("delete", "crd", "servicemonitors.monitoring.coreos.com", "--ignore-not-found")


# The smallest ServiceMonitor CRD a dry-run needs (the Prometheus Operator's own is far larger).
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
             "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor",
                       "listKind": "ServiceMonitorList"},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
}


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_rendered_manifests_pass_a_server_side_dry_run(local_cluster, dry_run_namespaces, values):
    docs = render(local_cluster, values, "--api-versions", MONITORING_API, namespace=dry_run_namespaces)
    # A pod is admitted only when its ServiceAccount exists: those are created for real first.
    local_cluster.apply(by_kind(docs, "ServiceAccount"))
    # --force-conflicts: cluster-scoped objects of the same name (the trainer-status policy) may
    # already exist, applied client-side by the sandbox in this session; field ownership is not
    # what this dry run checks, the API server's validation and admission are.
    result = local_cluster.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-",
                                   input=yaml.safe_dump_all(docs))
    assert result.returncode == 0, result.stderr
    # Pod Security "restricted" is enforced in the release namespace: not even a warning.
    assert "violate PodSecurity" not in result.stderr, result.stderr
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(docs), result.stdout
