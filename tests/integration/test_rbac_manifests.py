"""The operator's and the trainer's RBAC manifests grant what the code needs and nothing more.

The manifests are applied to a real API server with RBAC on; every check authenticates with a
token minted by the TokenRequest API for the real ServiceAccount (no impersonation), asks the
authorizer through SelfSubjectAccessReview, and, for the calls that matter most, makes the call.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorakube import contract
from lorakube_trainer.progress import StatusPatcher, api_target_from_env

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "loratrainingjobs.lorakube.io.yaml"
MANIFESTS = ROOT / "operator" / "lorakube" / "manifests"
OPERATOR_RBAC = MANIFESTS / "rbac-operator.yaml"
TRAINER_RBAC = MANIFESTS / "rbac-trainer.yaml"
OPERATOR_NAMESPACE = "lorakube-system"
OPERATOR_SA = "lorakube-operator"
TRAINER_SA = "lorakube-trainer"
LEASE = "lorakube-operator"
JOBS = f"{contract.API_GROUP}/{contract.PLURAL}"  # "group/resource" in the tables below


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def rules_of(path: Path, kind: str, name: str) -> list[dict[str, Any]]:
    (role,) = [d for d in documents(path) if d["kind"] == kind and d["metadata"]["name"] == name]
    return role["rules"]


# --- the manifests as written ------------------------------------------------------------------

@pytest.mark.parametrize("path", [OPERATOR_RBAC, TRAINER_RBAC], ids=lambda p: p.name)
def test_no_rule_uses_a_wildcard(path):
    for doc in documents(path):
        for rule in doc.get("rules", []):
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), (doc["metadata"]["name"], rule)


def test_trainer_role_is_only_status_get_and_patch():
    assert rules_of(TRAINER_RBAC, "ClusterRole", TRAINER_SA) == [
        {"apiGroups": [contract.API_GROUP], "resources": [f"{contract.PLURAL}/status"], "verbs": ["get", "patch"]}
    ]


def test_trainer_manifest_leaves_the_namespace_to_kubectl():
    # Applied with `kubectl apply -n <job namespace>`: nothing namespaced may pin its own namespace.
    for doc in documents(TRAINER_RBAC):
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
        for subject in doc.get("subjects", []):
            assert "namespace" not in subject


def test_operator_role_never_mentions_secrets_and_only_reads_nodes():
    rules = rules_of(OPERATOR_RBAC, "ClusterRole", OPERATOR_SA)
    resources = {r for rule in rules for r in rule["resources"]}
    assert not resources & {"secrets", "namespaces", "customresourcedefinitions",
                            "clusterrolebindings", "rolebindings", "pods/exec"}
    # A restart stuck on a pod whose node is gone reads that one Node (reconcile.nodes_to_check).
    assert [rule["verbs"] for rule in rules if "nodes" in rule["resources"]] == [["get"]]


# --- on the API server -------------------------------------------------------------------------

class Caller:
    """Raw HTTPS calls with one bearer token: nothing but the API server decides."""

    def __init__(self, server: str, ca_file: Path, token: str) -> None:
        self.server = server
        self.token = token
        self.context = ssl.create_default_context(cafile=str(ca_file))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.server}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type,
                     "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=15) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def can(self, verb: str, resource: str, namespace: str = "", subresource: str = "", name: str = "") -> bool:
        group, _, plural = resource.rpartition("/")
        attributes = {"verb": verb, "group": group, "resource": plural, "subresource": subresource,
                      "namespace": namespace, "name": name}
        code, review = self.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        })
        assert code == 201, review
        return review["status"]["allowed"]

    def whoami(self) -> str:
        code, review = self.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        assert code == 201, review
        return review["status"]["userInfo"]["username"]


@pytest.fixture(scope="module")
def installed(local_cluster) -> dict[str, str]:
    """CRD + operator RBAC, and the trainer RBAC in two job namespaces."""
    # Server-side, like lorakube.sandbox installs it: modules sharing the session cluster then
    # apply the CRD as the same field manager.
    local_cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE), check=True)
    local_cluster.kubectl("apply", "-f", str(OPERATOR_RBAC), check=True)
    namespaces = {"jobs": local_cluster.create_namespace(), "other": local_cluster.create_namespace()}
    for namespace in namespaces.values():
        local_cluster.kubectl("apply", "-n", namespace, "-f", str(TRAINER_RBAC), check=True)
    deadline = time.monotonic() + 60
    while local_cluster.kubectl("get", contract.SHORT_NAME, "-A").returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail("the LoRATrainingJob kind is not served 60 s after applying the CRD")
        time.sleep(0.5)
    yield namespaces
    for namespace in namespaces.values():
        local_cluster.delete_namespace(namespace)


@pytest.fixture(scope="module")
def operator(local_cluster, installed) -> Caller:
    token = local_cluster.token_for(OPERATOR_NAMESPACE, OPERATOR_SA)
    return Caller(local_cluster.server, local_cluster.ca_file, token)


@pytest.fixture(scope="module")
def trainer(local_cluster, installed) -> Caller:
    token = local_cluster.token_for(installed["jobs"], TRAINER_SA)
    return Caller(local_cluster.server, local_cluster.ca_file, token)


def test_tokens_authenticate_as_the_service_accounts(operator, trainer, installed):
    assert operator.whoami() == f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"
    assert trainer.whoami() == f"system:serviceaccount:{installed['jobs']}:{TRAINER_SA}"


# (verb, group/resource, subresource, where: "jobs" | "other" | "cluster" | "operator", name, allowed)
TRAINER_ACCESS = [
    ("patch", JOBS, "status", "jobs", "", True),
    ("get", JOBS, "status", "jobs", "", True),
    ("patch", JOBS, "", "jobs", "", False),
    ("update", JOBS, "", "jobs", "", False),
    ("delete", JOBS, "", "jobs", "", False),
    ("list", JOBS, "", "jobs", "", False),
    ("get", "pods", "", "jobs", "", False),
    ("list", "pods", "", "jobs", "", False),
    ("get", "secrets", "", "jobs", "", False),
    ("list", "configmaps", "", "jobs", "", False),
    ("create", "pods", "", "jobs", "", False),
    ("get", "pods", "log", "jobs", "", False),
    # The binding is per namespace: a token from one namespace cannot touch jobs elsewhere.
    ("patch", JOBS, "status", "other", "", False),
]

OPERATOR_ACCESS = [
    ("list", JOBS, "", "cluster", "", True),
    ("watch", JOBS, "", "cluster", "", True),
    ("get", JOBS, "", "jobs", "", True),
    ("patch", JOBS, "", "jobs", "", True),
    ("delete", JOBS, "", "jobs", "", True),
    ("patch", JOBS, "status", "jobs", "", True),
    ("update", JOBS, "finalizers", "jobs", "", True),
    ("update", JOBS, "", "jobs", "", False),
    ("create", JOBS, "", "jobs", "", False),
    ("list", "pods", "", "cluster", "", True),
    ("watch", "pods", "", "cluster", "", True),
    ("create", "pods", "", "jobs", "", True),
    ("delete", "pods", "", "jobs", "", True),
    ("get", "pods", "log", "jobs", "", True),
    ("create", "pods", "exec", "jobs", "", False),
    ("update", "pods", "", "jobs", "", False),
    ("get", "services", "", "jobs", "", True),
    ("create", "services", "", "jobs", "", True),
    ("get", "serviceaccounts", "", "jobs", "", True),
    ("create", "serviceaccounts", "", "jobs", "", False),
    ("create", "serviceaccounts", "token", "jobs", "", False),
    ("create", "events", "", "jobs", "", True),
    ("get", "secrets", "", "jobs", "", False),
    ("list", "secrets", "", "cluster", "", False),
    ("get", "nodes", "", "cluster", "", True),
    ("list", "nodes", "", "cluster", "", False),
    ("delete", "nodes", "", "cluster", "", False),
    ("list", "namespaces", "", "cluster", "", False),
    ("create", "rbac.authorization.k8s.io/rolebindings", "", "jobs", "", False),
    ("create", "rbac.authorization.k8s.io/clusterrolebindings", "", "cluster", "", False),
    ("update", "apiextensions.k8s.io/customresourcedefinitions", "", "cluster", "", False),
    # Leader election: one Lease, in the operator's namespace only.
    ("create", "coordination.k8s.io/leases", "", "operator", "", True),
    ("get", "coordination.k8s.io/leases", "", "operator", LEASE, True),
    ("update", "coordination.k8s.io/leases", "", "operator", LEASE, True),
    ("update", "coordination.k8s.io/leases", "", "operator", "kube-scheduler", False),
    ("create", "coordination.k8s.io/leases", "", "jobs", "", False),
]


def _where(installed: dict[str, str], where: str) -> str:
    fixed = {"cluster": "", "operator": OPERATOR_NAMESPACE}
    return fixed[where] if where in fixed else installed[where]


def _case_id(case: tuple) -> str:
    verb, resource, sub, where, name, allowed = case
    target = resource.rpartition("/")[2] + (f"/{sub}" if sub else "") + (f" {name}" if name else "")
    return f"{'may' if allowed else 'may not'} {verb} {target} ({where})"


@pytest.mark.parametrize("case", TRAINER_ACCESS, ids=[_case_id(c) for c in TRAINER_ACCESS])
def test_trainer_access(trainer, installed, case):
    verb, resource, sub, where, name, allowed = case
    assert trainer.can(verb, resource, _where(installed, where), sub, name) is allowed


@pytest.mark.parametrize("case", OPERATOR_ACCESS, ids=[_case_id(c) for c in OPERATOR_ACCESS])
def test_operator_access(operator, installed, case):
    verb, resource, sub, where, name, allowed = case
    assert operator.can(verb, resource, _where(installed, where), sub, name) is allowed


# --- real calls --------------------------------------------------------------------------------

def _job(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.KIND,
            "metadata": {"name": name},
            "spec": {"model": {"family": "sd3", "uri": "/models/sd3"}, "dataset": {"uri": "/data/set"},
                     "output": {"uri": "/outputs/sd3-lora"}}}


def _job_path(namespace: str, name: str, subresource: str = "") -> str:
    path = f"/apis/{contract.API_GROUP}/{contract.API_VERSION}/namespaces/{namespace}/{contract.PLURAL}/{name}"
    return f"{path}/{subresource}" if subresource else path


def test_trainer_progress_patcher_works_with_the_trainer_token(local_cluster, installed, tmp_path):
    """The trainer's own status patcher, set up the way a pod sets it up, under the real RBAC."""
    namespace = installed["jobs"]
    local_cluster.apply(_job("progress"), namespace=namespace)
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(local_cluster.token_for(namespace, TRAINER_SA))
    (sa_dir / "ca.crt").write_bytes(Path(local_cluster.ca_file).read_bytes())
    host, port = local_cluster.server.removeprefix("https://").rsplit(":", 1)
    env = {contract.ENV_REPORT_PROGRESS: "1", "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
           contract.ENV_JOB_NAME: "progress", contract.ENV_JOB_NAMESPACE: namespace}
    target = api_target_from_env(env, sa_dir=sa_dir)
    assert target is not None
    progress = contract.Progress(step=40, totalSteps=400, epoch=0, loss=0.125, samplesPerSecond=2.0,
                                 etaSeconds=180, updatedAt=contract.utc_now_iso())

    assert StatusPatcher(target).patch(progress) is True
    stored = local_cluster.get_json(contract.SHORT_NAME, "progress", namespace=namespace)
    assert stored["status"]["progress"] == progress.to_status()

    # The same token on a job in another namespace is refused, so training goes on without it.
    local_cluster.apply(_job("elsewhere"), namespace=installed["other"])
    elsewhere = api_target_from_env({**env, contract.ENV_JOB_NAMESPACE: installed["other"],
                                     contract.ENV_JOB_NAME: "elsewhere"}, sa_dir=sa_dir)
    assert StatusPatcher(elsewhere).patch(progress) is False


def test_trainer_token_cannot_change_the_spec_or_read_secrets(local_cluster, installed, trainer):
    namespace = installed["jobs"]
    local_cluster.apply(_job("guarded"), namespace=namespace)
    code, body = trainer.request("PATCH", _job_path(namespace, "guarded"),
                                 {"spec": {"training": {"loraRank": 128}}}, "application/merge-patch+json")
    assert code == 403, body
    # A spec change smuggled through the status subresource is ignored by the API server.
    code, body = trainer.request("PATCH", _job_path(namespace, "guarded", "status"),
                                 {"spec": {"training": {"loraRank": 128}}, "status": {"progressText": "1/2"}},
                                 "application/merge-patch+json")
    assert code == 200, body
    stored = local_cluster.get_json(contract.SHORT_NAME, "guarded", namespace=namespace)
    assert stored["spec"]["training"]["loraRank"] == 16
    assert trainer.request("GET", f"/api/v1/namespaces/{namespace}/secrets")[0] == 403
    assert trainer.request("GET", f"/api/v1/namespaces/{namespace}/pods")[0] == 403


def test_operator_token_creates_pods_but_cannot_read_secrets_or_delete_nodes(installed, operator):
    namespace = installed["jobs"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rbac-probe-node-0"},
           "spec": {"containers": [{"name": contract.TRAINER_CONTAINER, "image": "trainer:test"}]}}
    # dryRun=All: authorization and admission run exactly as for a real create; nothing is stored.
    code, body = operator.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", pod)
    assert code == 201, body
    assert operator.request("GET", f"/api/v1/namespaces/{namespace}/secrets")[0] == 403
    assert operator.request("DELETE", "/api/v1/nodes/any-node?dryRun=All")[0] == 403
    assert operator.request("GET", f"/apis/{contract.API_GROUP}/{contract.API_VERSION}/{contract.PLURAL}")[0] == 200
