"""The operator's RBAC, the per-job trainer RBAC it creates and the trainer-status admission
policy grant what the code needs and nothing more.

The manifests are applied to a real API server with RBAC on; every check authenticates with a
token minted by the TokenRequest API for the real ServiceAccount (no impersonation), asks the
authorizer through SelfSubjectAccessReview, and, for the calls that matter most, makes the call.
The per-job trainer objects are created the way the operator creates them (kube.Kube.create) under
the operator's own token, so RBAC's escalation check runs on them too.
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
from kubernetes import client

from lorakube import builders, kube, rbac
from lorakube_api import contract
from lorakube.spec import JobRef, parse_job
from lorakube_trainer.progress import StatusPatcher, api_target_from_env

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "loratrainingjobs.lorakube.io.yaml"
MANIFESTS = ROOT / "operator" / "lorakube" / "manifests"
OPERATOR_RBAC = MANIFESTS / "rbac-operator.yaml"
STATUS_POLICY = MANIFESTS / "trainer-status-policy.yaml"
OPERATOR_NAMESPACE = "lorakube-system"
OPERATOR_SA = "lorakube-operator"
LEASE = "lorakube-operator"
JOBS = f"{contract.API_GROUP}/{contract.PLURAL}"  # "group/resource" in the tables below
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def rules_of(path: Path, kind: str, name: str) -> list[dict[str, Any]]:
    (role,) = [d for d in documents(path) if d["kind"] == kind and d["metadata"]["name"] == name]
    return role["rules"]


# --- the manifests as written ------------------------------------------------------------------

def test_no_rule_uses_a_wildcard():
    trainer_role = rbac.build_role(JobRef("cats", "team-a", "7d1c6a2e-0000-4000-8000-000000000001"))
    for doc in documents(OPERATOR_RBAC) + [trainer_role]:
        for rule in doc.get("rules", []):
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), (doc["metadata"]["name"], rule)


def test_operator_role_never_mentions_secrets_and_only_reads_nodes():
    rules = rules_of(OPERATOR_RBAC, "ClusterRole", OPERATOR_SA)
    resources = {r for rule in rules for r in rule["resources"]}
    assert not resources & {"secrets", "namespaces", "customresourcedefinitions",
                            "clusterroles", "clusterrolebindings", "pods/exec", "serviceaccounts/token"}
    # It creates the trainer's Role and binding, but only with rights it holds itself.
    assert not {v for rule in rules for v in rule["verbs"]} & {"bind", "escalate", "impersonate"}
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
    """CRD, operator RBAC and the trainer-status policy; two job namespaces with nothing in them."""
    # Server-side, like lorakube_dev.sandbox installs it: modules sharing the session cluster then
    # apply the CRD as the same field manager.
    local_cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE), check=True)
    local_cluster.kubectl("apply", "-f", str(OPERATOR_RBAC), check=True)
    local_cluster.kubectl("apply", "-f", str(STATUS_POLICY), check=True)
    namespaces = {"jobs": local_cluster.create_namespace(), "other": local_cluster.create_namespace()}
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
def operator_kube(local_cluster, operator) -> kube.Kube:
    """The operator's own API layer, authenticated as the operator's ServiceAccount."""
    configuration = client.Configuration(host=local_cluster.server, api_key={"authorization": f"Bearer {operator.token}"})
    configuration.ssl_ca_cert = str(local_cluster.ca_file)
    return kube.Kube(client.ApiClient(configuration))


def _job(name: str, **resources: Any) -> dict[str, Any]:
    return {"apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}", "kind": contract.KIND,
            "metadata": {"name": name},
            "spec": {"model": {"family": "sd3", "uri": "/models/sd3"}, "dataset": {"uri": "/data/set"},
                     "output": {"uri": "/outputs/sd3-lora"}, "resources": resources}}


def _job_path(namespace: str, name: str, subresource: str = "") -> str:
    path = f"/apis/{contract.API_GROUP}/{contract.API_VERSION}/namespaces/{namespace}/{contract.PLURAL}/{name}"
    return f"{path}/{subresource}" if subresource else path


def make_job(local_cluster, operator_kube: kube.Kube, namespace: str, name: str, **resources: Any):
    """A job, and its trainer objects created as the operator creates them before the pods.
    Returns (JobRef, parsed spec)."""
    local_cluster.apply(_job(name, **resources), namespace=namespace)
    body = local_cluster.get_json(contract.SHORT_NAME, name, namespace=namespace)
    job = JobRef(name=name, namespace=namespace, uid=body["metadata"]["uid"])
    spec = parse_job(name, body["spec"])
    for manifest in rbac.build_trainer_access(spec, job):
        assert operator_kube.create(manifest) is True, manifest["kind"]
    return job, spec


def until(predicate, what: str, timeout: float = 30.0) -> None:
    """RBAC and admission policies reach the authorizer through informers: a moment after creation."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.3)


def may_patch_status(caller: Caller, job: JobRef) -> bool:
    return caller.can("patch", JOBS, job.namespace, "status", job.name)


@pytest.fixture(scope="module")
def trainer_job(local_cluster, installed, operator_kube) -> JobRef:
    job, _ = make_job(local_cluster, operator_kube, installed["jobs"], "progress")
    return job


@pytest.fixture(scope="module")
def trainer(local_cluster, trainer_job) -> Caller:
    """What rank 0 of the job `progress` holds: a token of the job's own ServiceAccount."""
    token = local_cluster.token_for(trainer_job.namespace, rbac.trainer_account_name(trainer_job.name))
    caller = Caller(local_cluster.server, local_cluster.ca_file, token)
    until(lambda: may_patch_status(caller, trainer_job), "the per-job RoleBinding taking effect")
    return caller


@pytest.fixture(scope="module")
def policy_active(local_cluster, installed, trainer, trainer_job) -> None:
    """Wait until the policy refuses a dry-run phase change by the trainer."""
    path = _job_path(trainer_job.namespace, trainer_job.name, "status") + "?dryRun=All"

    def refused() -> bool:
        code, body = trainer.request("PATCH", path, {"status": {"phase": "Failed"}}, MERGE)
        return code == 403 and "may change only status.progress" in body.get("message", "")

    until(refused, "the trainer-status ValidatingAdmissionPolicy taking effect", timeout=60)


MERGE = "application/merge-patch+json"


def test_tokens_authenticate_as_the_service_accounts(operator, trainer, trainer_job):
    assert operator.whoami() == f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"
    assert trainer.whoami() == f"system:serviceaccount:{trainer_job.namespace}:progress-trainer"


# (verb, group/resource, subresource, where: "jobs" | "other" | "cluster" | "operator", name, allowed)
TRAINER_ACCESS = [
    ("patch", JOBS, "status", "jobs", "progress", True),
    ("get", JOBS, "status", "jobs", "progress", True),
    # Its own job only: not a sibling in the same namespace, not "any job".
    ("patch", JOBS, "status", "jobs", "sibling", False),
    ("patch", JOBS, "status", "jobs", "", False),
    ("get", JOBS, "status", "jobs", "sibling", False),
    ("patch", JOBS, "", "jobs", "progress", False),
    ("update", JOBS, "status", "jobs", "progress", False),
    ("update", JOBS, "", "jobs", "progress", False),
    ("delete", JOBS, "", "jobs", "progress", False),
    ("list", JOBS, "", "jobs", "", False),
    ("get", "pods", "", "jobs", "", False),
    ("list", "pods", "", "jobs", "", False),
    ("get", "secrets", "", "jobs", "", False),
    ("list", "configmaps", "", "jobs", "", False),
    ("create", "pods", "", "jobs", "", False),
    ("get", "pods", "log", "jobs", "", False),
    ("patch", JOBS, "status", "other", "progress", False),
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
    # The per-job trainer account, Role and RoleBinding.
    ("get", "serviceaccounts", "", "jobs", "", True),
    ("create", "serviceaccounts", "", "jobs", "", True),
    ("create", "rbac.authorization.k8s.io/roles", "", "jobs", "", True),
    ("create", "rbac.authorization.k8s.io/rolebindings", "", "jobs", "", True),
    ("get", "rbac.authorization.k8s.io/roles", "", "jobs", "", True),
    ("get", "rbac.authorization.k8s.io/rolebindings", "", "jobs", "", True),
    ("update", "rbac.authorization.k8s.io/roles", "", "jobs", "", False),
    ("delete", "rbac.authorization.k8s.io/rolebindings", "", "jobs", "", False),
    ("bind", "rbac.authorization.k8s.io/clusterroles", "", "cluster", "", False),
    ("escalate", "rbac.authorization.k8s.io/roles", "", "jobs", "", False),
    ("impersonate", "serviceaccounts", "", "jobs", "", False),
    ("create", "serviceaccounts", "token", "jobs", "", False),
    ("delete", "serviceaccounts", "", "jobs", "", False),
    ("create", "events", "", "jobs", "", True),
    ("get", "secrets", "", "jobs", "", False),
    ("list", "secrets", "", "cluster", "", False),
    ("get", "nodes", "", "cluster", "", True),
    ("list", "nodes", "", "cluster", "", False),
    ("delete", "nodes", "", "cluster", "", False),
    ("list", "namespaces", "", "cluster", "", False),
    ("create", "rbac.authorization.k8s.io/clusterrolebindings", "", "cluster", "", False),
    ("create", "rbac.authorization.k8s.io/clusterroles", "", "cluster", "", False),
    ("update", "apiextensions.k8s.io/customresourcedefinitions", "", "cluster", "", False),
    ("create", "admissionregistration.k8s.io/validatingadmissionpolicies", "", "cluster", "", False),
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

def _sa_dir(tmp_path: Path, local_cluster, token: str) -> Path:
    """What the kubelet projects into rank 0: token and CA."""
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir(exist_ok=True)
    (sa_dir / "token").write_text(token)
    (sa_dir / "ca.crt").write_bytes(Path(local_cluster.ca_file).read_bytes())
    return sa_dir


def _pod_env(local_cluster, namespace: str, name: str) -> dict[str, str]:
    host, port = local_cluster.server.removeprefix("https://").rsplit(":", 1)
    return {contract.ENV_REPORT_PROGRESS: "1", "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
            contract.ENV_JOB_NAME: name, contract.ENV_JOB_NAMESPACE: namespace}


def test_rank_0s_token_patches_its_own_progress_and_nothing_of_another_job(
        local_cluster, installed, operator_kube, trainer, trainer_job, policy_active, tmp_path):
    """The trainer's own status patcher, set up the way rank 0 sets it up, under the per-job RBAC."""
    namespace = trainer_job.namespace
    sa_dir = _sa_dir(tmp_path, local_cluster, trainer.token)
    env = _pod_env(local_cluster, namespace, trainer_job.name)
    patcher = StatusPatcher(api_target_from_env(env, sa_dir=sa_dir))
    progress = contract.Progress(step=40, totalSteps=400, epoch=0, loss=0.125, samplesPerSecond=2.0,
                                 etaSeconds=180, updatedAt=contract.utc_now_iso())
    assert patcher.patch(progress) is True
    stored = local_cluster.get_json(contract.SHORT_NAME, trainer_job.name, namespace=namespace)
    assert stored["status"]["progress"] == progress.to_status()

    # The next attempt's first report knows no rate yet: its nulls delete the old speed and ETA.
    resumed = contract.Progress(step=40, totalSteps=400, epoch=0, loss=None, samplesPerSecond=None,
                                etaSeconds=None, updatedAt=contract.utc_now_iso())
    assert patcher.patch(resumed) is True
    stored = local_cluster.get_json(contract.SHORT_NAME, trainer_job.name, namespace=namespace)
    assert stored["status"]["progress"] == {"step": 40, "totalSteps": 400, "epoch": 0, "text": "40/400",
                                            "updatedAt": resumed.updatedAt}

    # A sibling job in the same namespace, and a job of the same name elsewhere: refused.
    make_job(local_cluster, operator_kube, namespace, "sibling")
    sibling = StatusPatcher(api_target_from_env({**env, contract.ENV_JOB_NAME: "sibling"}, sa_dir=sa_dir))
    assert sibling.patch(progress) is False
    local_cluster.apply(_job(trainer_job.name), namespace=installed["other"])
    elsewhere = api_target_from_env({**env, contract.ENV_JOB_NAMESPACE: installed["other"]}, sa_dir=sa_dir)
    assert StatusPatcher(elsewhere).patch(progress) is False
    code, body = trainer.request("PATCH", _job_path(namespace, "sibling", "status"),
                                 {"status": {"phase": "Failed"}}, MERGE)
    assert code == 403, body
    assert local_cluster.get_json(contract.SHORT_NAME, "sibling", namespace=namespace).get("status", {}) \
        .get("phase") != "Failed"


def test_rank_0s_token_cannot_change_the_operators_status_fields(local_cluster, trainer, trainer_job,
                                                                 operator, policy_active):
    namespace, name = trainer_job.namespace, trainer_job.name
    path = _job_path(namespace, name, "status")
    # What the operator wrote: a phase and the attempt that restarts depend on.
    failure = {"pod": "progress-node-1", "exitCode": 75, "reason": "RetryableExit"}
    code, body = operator.request("PATCH", path, {"status": {"phase": "Running", "attempt": 2,
                                                             "lastFailure": failure}}, MERGE)
    assert code == 200, body

    for change in ({"phase": "Succeeded"}, {"attempt": 1}, {"conditions": []}, {"lastFailure": None},
                   {"progress": {"step": 41}, "restarts": 0}):
        code, body = trainer.request("PATCH", path, {"status": change}, MERGE)
        assert code == 403, (change, body)
        assert "may change only status.progress and status.artifacts" in body["message"], body
        field = next(k for k in change if k != "progress")
        assert f"status.{field}" in body["message"], body
    code, body = trainer.request("PATCH", path, {"status": None}, MERGE)
    assert code == 403, body
    stored = local_cluster.get_json(contract.SHORT_NAME, name, namespace=namespace)["status"]
    assert stored["phase"] == "Running" and stored["attempt"] == 2 and stored["lastFailure"] == failure
    assert (stored.get("progress") or {}).get("step") != 41    # a refused request changes nothing at all

    # Its own part: progress, and the artifacts it publishes at the end.
    artifacts = contract.artifacts_status("/outputs/sd3-lora", {
        contract.ARTIFACT_LORA_DIFFUSERS: {"sha256": "ab" * 32, "bytes": 14696}})
    code, body = trainer.request("PATCH", path, {"status": {"progress": {"step": 41}, "artifacts": artifacts}},
                                 MERGE)
    assert code == 200, body
    # A spec change smuggled through the status subresource is ignored by the API server.
    code, body = trainer.request("PATCH", path, {"spec": {"training": {"loraRank": 128}},
                                                 "status": {"progress": {"step": 42}}}, MERGE)
    assert code == 200, body
    stored = local_cluster.get_json(contract.SHORT_NAME, name, namespace=namespace)
    assert stored["status"]["progress"]["step"] == 42 and stored["status"]["artifacts"] == artifacts
    assert stored["spec"]["training"]["loraRank"] == 16
    # The policy binds the job's trainer only: a person (admin here) still may change anything.
    local_cluster.kubectl("patch", contract.SHORT_NAME, name, "-n", namespace, "--subresource=status",
                          "--type=merge", "-p", json.dumps({"status": {"phase": "Failed"}}), check=True)


def test_trainer_token_cannot_change_the_spec_or_read_secrets(trainer, trainer_job):
    namespace = trainer_job.namespace
    code, body = trainer.request("PATCH", _job_path(namespace, trainer_job.name),
                                 {"spec": {"training": {"loraRank": 128}}}, MERGE)
    assert code == 403, body
    assert trainer.request("GET", f"/api/v1/namespaces/{namespace}/secrets")[0] == 403
    assert trainer.request("GET", f"/api/v1/namespaces/{namespace}/pods")[0] == 403


def test_a_user_named_account_gets_the_same_grant_for_its_job_only(local_cluster, installed, operator_kube,
                                                                  policy_active):
    namespace = installed["jobs"]
    local_cluster.kubectl("create", "serviceaccount", "storage", "-n", namespace, check=True)
    job, spec = make_job(local_cluster, operator_kube, namespace, "own-account", serviceAccountName="storage")
    # No per-job account is made for it; the job's Role is bound to the user's account instead.
    assert local_cluster.kubectl("get", "serviceaccount", "own-account-trainer", "-n", namespace).returncode != 0
    storage = Caller(local_cluster.server, local_cluster.ca_file, local_cluster.token_for(namespace, "storage"))
    until(lambda: may_patch_status(storage, job), "the RoleBinding to the user's account taking effect")
    path = _job_path(namespace, job.name, "status")
    assert storage.request("PATCH", path, {"status": {"progress": {"step": 1}}}, MERGE)[0] == 200
    code, body = storage.request("PATCH", path, {"status": {"phase": "Succeeded"}}, MERGE)
    assert code == 403 and "status.phase" in body["message"], body
    assert storage.request("PATCH", _job_path(namespace, "progress", "status"),
                           {"status": {"progress": {"step": 1}}}, MERGE)[0] == 403


def test_only_rank_0s_admitted_pod_carries_a_token(local_cluster, installed, operator_kube, operator):
    """The ServiceAccount admission plugin adds the token volume; the pods the operator builds
    opt rank 0 in and every other rank out. dryRun=All: the pod as admitted, nothing stored."""
    namespace = installed["jobs"]
    job, spec = make_job(local_cluster, operator_kube, namespace, "ranks", numNodes=3, gpusPerNode=0)
    for rank in range(3):
        pod = builders.build_pod(spec, job, 1, rank, builders.OperatorConfig())
        code, admitted = operator.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", pod)
        assert code == 201, admitted
        assert admitted["spec"]["serviceAccountName"] == "ranks-trainer"
        tokens = [v for v in admitted["spec"].get("volumes", [])
                  if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))]
        mounts = [m for m in admitted["spec"]["containers"][0].get("volumeMounts", [])
                  if m["mountPath"] == SA_MOUNT]
        if rank == 0:
            assert len(tokens) == 1 and [m["name"] for m in mounts] == [tokens[0]["name"]], admitted["spec"]
        else:
            assert tokens == [] and mounts == [], admitted["spec"]


def test_the_operator_cannot_grant_what_it_does_not_hold(operator, installed):
    namespace = installed["jobs"]
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "too-much"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}
    code, body = operator.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles"
                                          "?dryRun=All", role)
    assert code == 403 and "attempting to grant RBAC permissions not currently held" in body["message"], body


def test_trainer_objects_are_adopted_only_when_they_are_the_jobs(local_cluster, installed, operator_kube):
    namespace = installed["jobs"]
    job, spec = make_job(local_cluster, operator_kube, namespace, "adopt")
    # A second pass (or a restarted operator) finds its own objects: 409, adopted.
    assert [operator_kube.create(m) for m in rbac.build_trainer_access(spec, job)] == [False, False, False]
    # One left by someone else (or an earlier job of the same name) is not bound to this job.
    local_cluster.kubectl("create", "serviceaccount", "squatted-trainer", "-n", namespace, check=True)
    local_cluster.apply(_job("squatted"), namespace=namespace)
    uid = local_cluster.get_json(contract.SHORT_NAME, "squatted", namespace=namespace)["metadata"]["uid"]
    squatted = JobRef("squatted", namespace, uid)
    with pytest.raises(kube.Transient, match="ServiceAccount squatted-trainer already exists"):
        operator_kube.create(rbac.build_service_account(squatted))


def test_the_trainer_objects_go_with_the_job(local_cluster, installed, operator_kube):
    namespace = installed["jobs"]
    job, _ = make_job(local_cluster, operator_kube, namespace, "doomed")
    token = local_cluster.token_for(namespace, "doomed-trainer")
    doomed = Caller(local_cluster.server, local_cluster.ca_file, token)
    until(lambda: may_patch_status(doomed, job), "the per-job RoleBinding taking effect")
    assert doomed.request("PATCH", _job_path(namespace, "doomed", "status"),
                          {"status": {"progress": {"step": 1}}}, MERGE)[0] == 200

    local_cluster.kubectl("delete", contract.SHORT_NAME, "doomed", "-n", namespace, "--wait=true", check=True)
    deadline = time.monotonic() + 60
    kinds = "serviceaccount,role.rbac.authorization.k8s.io,rolebinding.rbac.authorization.k8s.io"
    while local_cluster.kubectl("get", kinds, "-n", namespace, "-l", f"{contract.LABEL_JOB_NAME}=doomed",
                                "-o", "name", check=True).stdout.strip():
        if time.monotonic() > deadline:
            pytest.fail("the job's ServiceAccount, Role and RoleBinding were not garbage-collected in 60 s")
        time.sleep(0.5)
    # With its account gone, the token a pod of that job held no longer authenticates.
    until(lambda: doomed.request("GET", "/api")[0] == 401, "the deleted account's token being refused")


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
