"""Authorization and admission are the real ones: RBAC denies until a binding allows, and Pod
Security `restricted` rejects a privileged pod while admitting a compliant one."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.cluster


def _list_pods_status(local_cluster, namespace: str, token: str) -> int:
    """HTTP status of a raw `list pods` with a bearer token: no client-side logic in between."""
    request = urllib.request.Request(
        f"{local_cluster.server}/api/v1/namespaces/{namespace}/pods",
        headers={"Authorization": f"Bearer {token}"},
    )
    context = ssl.create_default_context(cafile=str(local_cluster.ca_file))
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _reader_role(namespace: str) -> list[dict]:
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "pod-reader", "namespace": namespace},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "pod-reader", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]},
    ]


def test_service_account_token_is_denied_until_a_role_binding_allows(local_cluster, new_namespace):
    local_cluster.kubectl("create", "serviceaccount", "reader", "-n", new_namespace, check=True)
    token = local_cluster.token_for(new_namespace, "reader")
    kubeconfig = local_cluster.kubeconfig_for_token(token, user="reader")

    # The apiserver authenticates the token itself as the ServiceAccount (no impersonation).
    whoami = json.loads(local_cluster.kubectl("auth", "whoami", "-o", "json",
                                              kubeconfig=kubeconfig, check=True).stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{new_namespace}:reader"
    assert _list_pods_status(local_cluster, new_namespace, token + "x") == 401

    assert _list_pods_status(local_cluster, new_namespace, token) == 403
    denied = local_cluster.kubectl("get", "pods", "-n", new_namespace, kubeconfig=kubeconfig)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and 'cannot list resource "pods"' in denied.stderr

    local_cluster.apply(_reader_role(new_namespace))
    deadline = time.monotonic() + 30
    while _list_pods_status(local_cluster, new_namespace, token) != 200:
        assert time.monotonic() < deadline, "RoleBinding did not take effect within 30 s"
        time.sleep(0.3)
    allowed = local_cluster.kubectl("get", "pods", "-n", new_namespace, kubeconfig=kubeconfig)
    assert allowed.returncode == 0, allowed.stderr

    # The binding is namespaced: elsewhere, and for other verbs, the answer is still no.
    assert _list_pods_status(local_cluster, "default", token) == 403
    create = local_cluster.kubectl("create", "configmap", "x", "-n", new_namespace,
                                   kubeconfig=kubeconfig)
    assert create.returncode != 0 and "forbidden" in create.stderr


def _pod(name: str, container_security: dict, pod_security: dict | None = None) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "securityContext": pod_security or {},
            "containers": [{"name": "main", "image": "busybox", "command": ["true"],
                            "securityContext": container_security}],
            "restartPolicy": "Never",
        },
    }


RESTRICTED_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 65534,
                           "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER_SECURITY = {"allowPrivilegeEscalation": False,
                                 "capabilities": {"drop": ["ALL"]}}


def test_pod_security_restricted_rejects_privileged_and_admits_compliant(local_cluster):
    namespace = local_cluster.create_namespace(
        labels={"pod-security.kubernetes.io/enforce": "restricted"})
    try:
        rejected = local_cluster.kubectl(
            "create", "-n", namespace, "-f", "-",
            input=json.dumps(_pod("privileged", {"privileged": True})),
        )
        assert rejected.returncode != 0
        assert 'violates PodSecurity "restricted:latest"' in rejected.stderr
        assert "privileged" in rejected.stderr
        assert local_cluster.kubectl("get", "pod", "privileged", "-n", namespace).returncode != 0

        compliant = _pod("compliant", RESTRICTED_CONTAINER_SECURITY, RESTRICTED_POD_SECURITY)
        admitted = local_cluster.kubectl("create", "-n", namespace, "-f", "-",
                                         input=json.dumps(compliant))
        assert admitted.returncode == 0, admitted.stderr
        local_cluster.kubectl("get", "pod", "compliant", "-n", namespace, check=True)
    finally:
        local_cluster.delete_namespace(namespace)


def test_privileged_pod_is_admitted_where_no_policy_is_enforced(local_cluster, new_namespace):
    # The control case: the rejection above comes from the namespace label, not from the cluster.
    result = local_cluster.kubectl(
        "create", "--dry-run=server", "-n", new_namespace, "-f", "-",
        input=json.dumps(_pod("privileged", {"privileged": True})),
    )
    assert result.returncode == 0, result.stderr
