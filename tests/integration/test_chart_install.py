"""`helm install` of charts/lorakube on the local cluster, with the real helm: the operator runs as a
Deployment on the process node (2 replicas, one leading), with exactly the permissions of the
reviewed table below; `helm test` trains a tiny model; killing the leader and `helm upgrade` during a
job leave the job Succeeded with no pod created twice; `helm uninstall` leaves only the kept CRD and
the users' jobs.

One release for the module (the tests run in file order and build on each other: install, then
permissions, then the leader kill, then upgrade and uninstall). Lease timings are short (4 s / 3 s /
0.5 s) so a takeover is quick.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config, watch

from chart_helpers import CHART, helm, render, set_args
from lorakube import leader
from lorakube_api import contract
from lorakube_dev import sandbox, sync_crd
from localcluster.pytest_plugin import wait_for

pytestmark = pytest.mark.cluster

RELEASE = "lk"
FULLNAME = "lk-lorakube"
SERVICE_ACCOUNT = f"{FULLNAME}-operator"
DEPLOYMENT = f"{FULLNAME}-operator"
LEASE_SECONDS, RENEW_SECONDS, RETRY_SECONDS = 4, 3, 0.5
VALUES = {
    "image": {"repository": "lorakube-operator", "tag": "test"},   # images are ignored by the process node
    "leaderElection": {"leaseDurationSeconds": LEASE_SECONDS, "renewDeadlineSeconds": RENEW_SECONDS,
                       "retryPeriodSeconds": RETRY_SECONDS},
    "operator": {"reconcileIntervalSeconds": 1},
    "probes": {"liveness": {"initialDelaySeconds": 5, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
               "readiness": {"initialDelaySeconds": 1, "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 3}},
    "tests": {"job": {"timeoutSeconds": 400}},
}
CRD_NAME = f"{contract.PLURAL}.{contract.API_GROUP}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Where the tiny model and the dataset go: the release names the paths, `data_dir` (only the
    tests that train) fills them."""
    return tmp_path_factory.mktemp("chart-data")


@pytest.fixture(scope="module")
def data_dir(data_root) -> Path:
    return sandbox.prepare_data(data_root, log=lambda _: None)


@pytest.fixture(scope="module")
def api(local_cluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(local_cluster.kubeconfig))


@pytest.fixture(scope="module")
def release(local_cluster, data_root):
    """The chart installed into a namespace that enforces Pod Security `restricted`; returns the
    release namespace. Uninstalled at the end if the last test did not."""
    namespace = local_cluster.create_namespace(labels={"pod-security.kubernetes.io/enforce": "restricted"})
    # Other modules of the session apply the CRD with kubectl: adopt it into the release as a user
    # would (Helm refuses to take over an object it does not own).
    if local_cluster.kubectl("get", "crd", CRD_NAME).returncode == 0:
        local_cluster.kubectl("label", "--overwrite", "crd", CRD_NAME, "app.kubernetes.io/managed-by=Helm", check=True)
        local_cluster.kubectl("annotate", "--overwrite", "crd", CRD_NAME, f"meta.helm.sh/release-name={RELEASE}",
                              f"meta.helm.sh/release-namespace={namespace}", check=True)
    values = {**VALUES, "tests": {"job": {**VALUES["tests"]["job"], "modelUri": str(data_root / "model"),
                                          "datasetUri": str(data_root / "dataset")}}}
    started = time.monotonic()
    installed = helm(local_cluster, "install", RELEASE, str(CHART), "-n", namespace, *set_args(values), "--wait",
                     "--timeout", "180s")
    print(f"helm install --wait: {time.monotonic() - started:.1f} s")
    # NOTES.txt: what to do next.
    for hint in ("kubectl get ltj", f"helm test {RELEASE} -n {namespace}", "charts/lorakube/README.md"):
        assert hint in installed.stdout, installed.stdout
    yield namespace
    if helm(local_cluster, "status", RELEASE, "-n", namespace, check=False).returncode == 0:
        helm(local_cluster, "uninstall", RELEASE, "-n", namespace, "--wait", check=False)
    local_cluster.delete_namespace(namespace)


@pytest.fixture(scope="module")
def jobs_namespace(local_cluster):
    """Where users run jobs (hostPath volumes: no Pod Security label)."""
    namespace = local_cluster.create_namespace()
    yield namespace
    # A job left unfinished keeps Kopf's finalizer, and no operator is left to remove it.
    for job in local_cluster.get_json(contract.SHORT_NAME, namespace=namespace)["items"]:
        local_cluster.kubectl("patch", contract.SHORT_NAME, job["metadata"]["name"], "-n", namespace, "--type=merge",
                              "-p", '{"metadata":{"finalizers":null}}')
    local_cluster.delete_namespace(namespace)


def operator_pods(local_cluster, namespace: str) -> list[dict]:
    items = local_cluster.get_json("pods", "-l", f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator",
                                   namespace=namespace)["items"]
    # A replaced pod (its process killed while the node treated restartPolicy as Never) is not one.
    return [pod for pod in items if not pod["metadata"].get("deletionTimestamp")
            and pod["status"].get("phase") not in ("Failed", "Succeeded")]


def lease_holder(local_cluster, namespace: str) -> str | None:
    result = local_cluster.kubectl("get", "lease", leader.LEASE_NAME, "-n", namespace,
                                   "-o", "jsonpath={.spec.holderIdentity}")
    return result.stdout.strip() or None if result.returncode == 0 else None


def available(local_cluster, namespace: str) -> dict | None:
    deployment = local_cluster.get_json("deployment", DEPLOYMENT, namespace=namespace)
    status = deployment["status"]
    done = (status.get("observedGeneration") == deployment["metadata"]["generation"]
            and status.get("updatedReplicas") == status.get("availableReplicas") == status.get("replicas") == 2
            and status.get("readyReplicas") == 2)
    return deployment if done else None


def wait_available_with_a_leader(local_cluster, namespace: str) -> tuple[list[dict], str]:
    wait_for("the operator Deployment to be Available with 2 replicas", lambda: available(local_cluster, namespace),
             timeout=120)
    pods = wait_for("2 running operator pods", lambda: (lambda p: p if len(p) == 2 and all(
        x["status"].get("phase") == "Running" for x in p) else None)(operator_pods(local_cluster, namespace)),
        timeout=60)
    names = {pod["metadata"]["name"] for pod in pods}
    deadline = time.monotonic() + 60
    while (holder := lease_holder(local_cluster, namespace)) not in names:
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name} ---\n{local_cluster.kubectl('logs', name, '-n', namespace).stdout[-3000:]}"
                             for name in sorted(names))
            pytest.fail(f"the Lease holder is {holder!r}, not one of {sorted(names)}\n{logs}")
        time.sleep(0.3)
    return pods, holder


class PodCreations:
    """Every pod the apiserver announces in a namespace, from a watch started before the job: each
    (job, attempt, rank) must map to one pod uid."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.seen: dict[tuple[str, str, str], set[tuple[str, str]]] = defaultdict(set)
        self._stop = threading.Event()
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, args=(client.CoreV1Api(api), namespace), daemon=True)
        self._thread.start()

    def _run(self, core: client.CoreV1Api, namespace: str) -> None:
        while not self._stop.is_set():
            try:
                for event in self._watch.stream(core.list_namespaced_pod, namespace, timeout_seconds=30,
                                                label_selector=f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}"):
                    pod = event["object"]
                    labels = pod.metadata.labels or {}
                    key = (labels.get(contract.LABEL_JOB_NAME), labels.get(contract.LABEL_ATTEMPT),
                           labels.get(contract.LABEL_RANK))
                    self.seen[key].add((pod.metadata.name, pod.metadata.uid))
                    if self._stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - a dropped watch: list again (uids dedupe replays)
                time.sleep(0.2)

    def stop(self) -> dict[tuple[str, str, str], set[tuple[str, str]]]:
        self._stop.set()
        self._watch.stop()
        self._thread.join(timeout=35)
        return dict(self.seen)


def assert_each_pod_created_once(creations: dict, job: str) -> None:
    mine = {key: pods for key, pods in creations.items() if key[0] == job}
    assert mine, f"no pod of {job} was seen"
    twice = {key: pods for key, pods in mine.items() if len(pods) != 1}
    assert not twice, f"(job, attempt, rank) created more than once: {twice}"


def run_job(local_cluster, data_dir: Path, namespace: str, name: str, steps: int = 4) -> None:
    body = sandbox.quickstart_job(data_dir, name=name, resources={"numNodes": 1},
                                  training={"stepsPerEpoch": steps, "checkpointEverySteps": 2})
    # The process node's pods see the host's files: the paths are used as they are, without the
    # quickstart's hostPath volume (a host mount point other clusters on this machine may race on).
    spec = body["spec"]
    spec["resources"].pop("volumes")
    spec["resources"].pop("volumeMounts")
    spec["model"]["uri"] = str(data_dir / "model")
    spec["dataset"]["uri"] = str(data_dir / "dataset")
    spec["output"]["uri"] = str(data_dir / "output" / name)
    sandbox.apply_job(local_cluster.cluster.kubectl, namespace, body)


def job_pods_running(local_cluster, namespace: str, name: str) -> bool:
    pods = local_cluster.get_json("pods", "-l", f"{contract.LABEL_JOB_NAME}={name}", namespace=namespace)["items"]
    return bool(pods) and all(pod["status"].get("phase") == "Running" for pod in pods)


def finish(local_cluster, namespace: str, name: str) -> dict:
    body = sandbox.follow(local_cluster.cluster.kubectl, namespace, name, timeout=400)
    status = body.get("status") or {}
    assert status.get("phase") == "Succeeded", json.dumps(status, indent=1)[-3000:]
    return body


# --- c) install, leader, ServiceAccount, helm test --------------------------------------------------

def test_install_runs_two_replicas_one_leading_under_the_charts_service_account(local_cluster, release):
    pods, holder = wait_available_with_a_leader(local_cluster, release)
    assert len({pod["spec"]["nodeName"] for pod in pods}) >= 1 and all(pod["spec"].get("nodeName") for pod in pods)
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == SERVICE_ACCOUNT
        # The API credentials are that account's token (in-cluster config), nothing else.
        assert pod["spec"].get("automountServiceAccountToken") is not False
        projected = [v for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access-")]
        assert projected, pod["spec"]["volumes"]
        env = {item["name"]: item for item in pod["spec"]["containers"][0]["env"]}
        assert "KUBECONFIG" not in env
    # Exactly one leads: the holder is one pod; the other replica logs that it waits.
    follower = next(pod["metadata"]["name"] for pod in pods if pod["metadata"]["name"] != holder)
    wait_for("the follower to report it waits for the Lease",
             lambda: "waiting for the lease" in local_cluster.kubectl("logs", follower, "-n", release).stdout)
    leader_log = local_cluster.kubectl("logs", holder, "-n", release).stdout
    assert f"acquired the lease {release}/{leader.LEASE_NAME} as {holder}" in leader_log
    assert "acquired the lease" not in local_cluster.kubectl("logs", follower, "-n", release).stdout


@pytest.mark.slow
def test_helm_test_trains_a_tiny_job_to_succeeded(local_cluster, release, data_dir):
    started = time.monotonic()
    # No --logs: hook-succeeded has deleted the pod by then (nothing of the test may outlive it).
    result = helm(local_cluster, "test", RELEASE, "-n", release, "--timeout", "420s", check=False, timeout=480)
    print(f"helm test: {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert f"TEST SUITE:     {FULLNAME}-test" in result.stdout
    assert "Phase:          Failed" not in result.stdout
    assert result.stdout.count("Phase:          Succeeded") == 5  # ServiceAccount, Role, binding, job, pod
    # hook-succeeded: the test's job, pod and RBAC are gone again.
    assert local_cluster.kubectl("get", contract.SHORT_NAME, f"{FULLNAME}-test", "-n", release).returncode != 0


# --- b) permissions through SubjectAccessReview -----------------------------------------------------

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
# (group, resource, subresource) probed in a job namespace.
PROBED = [
    ("lorakube.io", "loratrainingjobs", ""), ("lorakube.io", "loratrainingjobs", "status"),
    ("lorakube.io", "loratrainingjobs", "finalizers"),
    ("", "pods", ""), ("", "pods", "log"), ("", "pods", "exec"), ("", "pods", "attach"), ("", "pods", "portforward"),
    ("", "pods", "eviction"), ("", "services", ""), ("", "serviceaccounts", ""), ("", "serviceaccounts", "token"),
    ("", "secrets", ""), ("", "configmaps", ""), ("", "events", ""), ("", "persistentvolumeclaims", ""),
    ("rbac.authorization.k8s.io", "roles", ""), ("rbac.authorization.k8s.io", "rolebindings", ""),
    ("apps", "deployments", ""), ("batch", "jobs", ""), ("coordination.k8s.io", "leases", ""),
    ("kueue.x-k8s.io", "workloads", ""),
]
CLUSTER_PROBED = [
    ("", "nodes", ""), ("", "namespaces", ""), ("apiextensions.k8s.io", "customresourcedefinitions", ""),
    ("rbac.authorization.k8s.io", "clusterroles", ""), ("rbac.authorization.k8s.io", "clusterrolebindings", ""),
    ("admissionregistration.k8s.io", "validatingadmissionpolicies", ""),
]
# The reviewed table: everything the operator may do in a job namespace, and nothing more.
EXPECTED_IN_JOB_NAMESPACE = {
    "loratrainingjobs": {"get", "list", "watch", "patch", "delete"},
    "loratrainingjobs/status": {"get", "patch"},
    "loratrainingjobs/finalizers": {"update"},
    "pods": {"get", "list", "watch", "create", "delete"},
    "pods/log": {"get"},
    "services": {"get", "create"},
    "serviceaccounts": {"get", "create"},
    "roles": {"get", "create"},
    "rolebindings": {"get", "create"},
    "events": {"create"},
    "workloads": {"get", "delete"},
}
EXPECTED_CLUSTER_SCOPED = {"nodes": {"get"}}


def review(api: client.ApiClient, namespace: str, sa: str, verb: str, group: str, resource: str,
           subresource: str = "", in_namespace: str = "", name: str = "") -> bool:
    body = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=f"system:serviceaccount:{namespace}:{sa}",
        groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
        resource_attributes=client.V1ResourceAttributes(verb=verb, group=group, resource=resource,
                                                        subresource=subresource or None,
                                                        namespace=in_namespace or None, name=name or None)))
    return client.AuthorizationV1Api(api).create_subject_access_review(body).status.allowed


def permissions(api, namespace: str, sa: str, probed, in_namespace: str) -> dict[str, set[str]]:
    table: dict[str, set[str]] = {}
    for group, resource, subresource in probed:
        allowed = {verb for verb in VERBS
                   if review(api, namespace, sa, verb, group, resource, subresource, in_namespace)}
        if allowed:
            table[f"{resource}/{subresource}" if subresource else resource] = allowed
    return table


def test_operator_permissions_equal_the_reviewed_table(local_cluster, release, jobs_namespace, api):
    in_jobs = permissions(api, release, SERVICE_ACCOUNT, PROBED, jobs_namespace)
    # Leases of the release namespace are the leader election's, checked below.
    assert in_jobs == EXPECTED_IN_JOB_NAMESPACE
    assert permissions(api, release, SERVICE_ACCOUNT, CLUSTER_PROBED, "") == EXPECTED_CLUSTER_SCOPED
    # Watching every namespace: the job-namespace table holds cluster-wide, Secrets stay out.
    everywhere = permissions(api, release, SERVICE_ACCOUNT, PROBED, "")
    assert everywhere == EXPECTED_IN_JOB_NAMESPACE
    for verb in ("get", "list", "watch"):
        assert not review(api, release, SERVICE_ACCOUNT, verb, "", "secrets")
    # No wildcard grants: a `*` verb or resource is never allowed.
    assert not review(api, release, SERVICE_ACCOUNT, "*", "", "pods", in_namespace=jobs_namespace)
    assert not review(api, release, SERVICE_ACCOUNT, "get", "*", "*", in_namespace=jobs_namespace)
    assert not review(api, release, SERVICE_ACCOUNT, "create", "", "pods", "exec", jobs_namespace)
    # Granting the trainer Role needs neither bind nor escalate (it holds what it grants).
    for verb in ("bind", "escalate"):
        assert not review(api, release, SERVICE_ACCOUNT, verb, "rbac.authorization.k8s.io", "roles",
                          in_namespace=jobs_namespace)
        assert not review(api, release, SERVICE_ACCOUNT, verb, "rbac.authorization.k8s.io", "clusterroles")
    assert not review(api, release, SERVICE_ACCOUNT, "impersonate", "", "serviceaccounts", in_namespace=jobs_namespace)
    # The leader Lease: create any (create cannot name one), get/update only lorakube-operator, in
    # the release namespace only.
    assert review(api, release, SERVICE_ACCOUNT, "create", "coordination.k8s.io", "leases", in_namespace=release)
    for verb in ("get", "update"):
        assert review(api, release, SERVICE_ACCOUNT, verb, "coordination.k8s.io", "leases", in_namespace=release,
                      name=leader.LEASE_NAME)
        assert not review(api, release, SERVICE_ACCOUNT, verb, "coordination.k8s.io", "leases",
                          in_namespace=release, name="kube-scheduler")
    assert not review(api, release, SERVICE_ACCOUNT, "delete", "coordination.k8s.io", "leases",
                      in_namespace=release, name=leader.LEASE_NAME)
    assert not review(api, release, SERVICE_ACCOUNT, "create", "coordination.k8s.io", "leases",
                      in_namespace=jobs_namespace)


def test_namespaced_install_grants_the_table_only_in_the_watched_namespaces(local_cluster, release, api):
    """watch.namespaces: the same table in each listed namespace, none elsewhere, `get nodes`."""
    scratch = local_cluster.create_namespace()
    watched, other = local_cluster.create_namespace(), local_cluster.create_namespace()
    docs = [doc for doc in render(local_cluster, {"watch": {"namespaces": [watched]}}, release="scoped",
                                  namespace=scratch)
            if doc["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
            and "helm.sh/hook" not in (doc["metadata"].get("annotations") or {})
            and not doc["metadata"]["name"].endswith(("-edit", "-view"))]
    for doc in docs:
        assert "*" not in json.dumps(doc.get("rules", [])), doc
    try:
        local_cluster.apply(docs)
        sa = "scoped-lorakube-operator"
        wait_for("the Role to take effect", lambda: review(api, scratch, sa, "create", "", "pods", in_namespace=watched))
        assert permissions(api, scratch, sa, PROBED, watched) == EXPECTED_IN_JOB_NAMESPACE
        assert permissions(api, scratch, sa, PROBED, other) == {}
        assert permissions(api, scratch, sa, PROBED, "") == {}  # nothing cluster-wide ...
        assert permissions(api, scratch, sa, CLUSTER_PROBED, "") == EXPECTED_CLUSTER_SCOPED  # ... but get nodes
    finally:
        local_cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=yaml.safe_dump_all(docs))
        for namespace in (scratch, watched, other):
            local_cluster.delete_namespace(namespace)


# --- d) the leader dies ----------------------------------------------------------------------------

def container_pid(local_cluster, pod: dict) -> int:
    """The operator process of a pod on the process node (its record, checked against the pod's env)."""
    record = local_cluster.cluster.node_state_dir / "procs" / f"{pod['metadata']['uid']}_operator.json"
    pid = json.loads(record.read_text())["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"POD_NAME={pod['metadata']['name']}".encode() in environ, "not the pod's process"
    return pid


@pytest.mark.slow
def test_killing_the_leader_hands_over_within_the_lease_and_the_job_still_succeeds(
        local_cluster, release, jobs_namespace, data_dir, api):
    pods, holder = wait_available_with_a_leader(local_cluster, release)
    (other,) = [pod["metadata"]["name"] for pod in pods if pod["metadata"]["name"] != holder]
    creations = PodCreations(api, jobs_namespace)
    try:
        run_job(local_cluster, data_dir, jobs_namespace, "failover")
        wait_for("the job's pod to run", lambda: job_pods_running(local_cluster, jobs_namespace, "failover"),
                 timeout=120)
        pid = container_pid(local_cluster, next(pod for pod in pods if pod["metadata"]["name"] == holder))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(f"{other} to take the Lease", lambda: lease_holder(local_cluster, release) == other,
                 timeout=LEASE_SECONDS + 30, every=0.1)
        took = time.monotonic() - killed
        print(f"takeover {took:.1f} s after the leader was killed")
        # The follower waits one lease duration from the last renewal it saw (at most one retry
        # period before the kill); two seconds of slack for polling and a loaded machine.
        assert took <= LEASE_SECONDS + RETRY_SECONDS + 2.0, f"took {took:.1f} s"
        finish(local_cluster, jobs_namespace, "failover")
    finally:
        seen = creations.stop()
    assert_each_pod_created_once(seen, "failover")
    wait_available_with_a_leader(local_cluster, release)


# --- e) upgrade during a job, then uninstall --------------------------------------------------------

@pytest.mark.slow
def test_upgrade_during_a_job_rolls_the_operator_and_the_job_succeeds(local_cluster, release, jobs_namespace,
                                                                      data_dir, api):
    before, _ = wait_available_with_a_leader(local_cluster, release)
    creations = PodCreations(api, jobs_namespace)
    try:
        run_job(local_cluster, data_dir, jobs_namespace, "upgrade", steps=12)  # outlasts the rollout
        wait_for("the job's pod to run", lambda: job_pods_running(local_cluster, jobs_namespace, "upgrade"),
                 timeout=120)
        started = time.monotonic()
        helm(local_cluster, "upgrade", RELEASE, str(CHART), "-n", release, "--reuse-values",
             *set_args({"operator": {"reconcileIntervalSeconds": 2, "verbose": True}}), "--wait", "--timeout", "180s")
        print(f"helm upgrade --wait: {time.monotonic() - started:.1f} s")
        after, holder = wait_available_with_a_leader(local_cluster, release)
        old = {pod["metadata"]["name"] for pod in before}
        new = {pod["metadata"]["name"] for pod in after}
        assert not old & new, "the operator pods did not roll"
        env = {e["name"]: e.get("value") for e in after[0]["spec"]["containers"][0]["env"]}
        assert env["LORAKUBE_RECONCILE_INTERVAL_SECONDS"] == "2"
        assert "--verbose" in after[0]["spec"]["containers"][0]["args"]
        phase = (local_cluster.get_json(contract.SHORT_NAME, "upgrade", namespace=jobs_namespace).get("status") or {})
        print(f"job phase once the new replicas were available: {phase.get('phase')}")
        finish(local_cluster, jobs_namespace, "upgrade")
    finally:
        seen = creations.stop()
    assert_each_pod_created_once(seen, "upgrade")


def release_objects(local_cluster, namespaces: list[str]) -> list[str]:
    """Every object (namespaced in `namespaces`, or cluster-scoped) that says it belongs to the
    release, as kind/name."""
    found = []
    for scope, where in ((["--namespaced=true"], namespaces), (["--namespaced=false"], [None])):
        kinds = local_cluster.kubectl("api-resources", "--verbs=list", "-o", "name", *scope, check=True).stdout.split()
        kinds = [kind for kind in kinds if kind not in ("events", "events.events.k8s.io")]
        for namespace in where:
            args = ["get", ",".join(kinds), "-o", "json"] + (["-n", namespace] if namespace else [])
            for item in json.loads(local_cluster.kubectl(*args, check=True).stdout)["items"]:
                meta = item["metadata"]
                if ((meta.get("labels") or {}).get("app.kubernetes.io/instance") == RELEASE
                        or (meta.get("annotations") or {}).get("meta.helm.sh/release-name") == RELEASE):
                    found.append(f"{item['kind']}/{meta['name']}")
    return sorted(found)


def test_uninstall_leaves_only_the_kept_crd_and_the_users_jobs(local_cluster, release, jobs_namespace, data_root):
    assert release_objects(local_cluster, [release, jobs_namespace])  # the release is there
    # A user's job that is still going (its pod never schedules) when the operator goes away.
    body = sandbox.quickstart_job(data_root, name="survivor", resources={"numNodes": 1,
                                  "nodeSelector": {"lorakube.io/test": "nowhere"}})
    sandbox.apply_job(local_cluster.cluster.kubectl, jobs_namespace, body)
    wait_for("the operator to take the job on", lambda: (local_cluster.get_json(
        contract.SHORT_NAME, "survivor", namespace=jobs_namespace).get("status") or {}).get("phase"))
    helm(local_cluster, "uninstall", RELEASE, "-n", release, "--wait", "--timeout", "120s")
    # helm waits for what it deleted; the pods go after their graceful shutdown.
    wait_for("the operator pods to be gone", lambda: not local_cluster.get_json(
        "pods", "-l", f"app.kubernetes.io/instance={RELEASE}", namespace=release)["items"], timeout=90)
    remaining = release_objects(local_cluster, [release, jobs_namespace])
    print("left after helm uninstall:", remaining)
    assert remaining == [f"CustomResourceDefinition/{CRD_NAME}"]
    crd = local_cluster.get_json("crd", CRD_NAME)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    jobs = local_cluster.get_json(contract.SHORT_NAME, namespace=jobs_namespace)["items"]
    # failover and upgrade too when the slow tier ran
    assert "survivor" in {job["metadata"]["name"] for job in jobs}
    # What else is in the release namespace: only what every namespace has, and the Lease the
    # operator wrote. It is not the release's (helm never made it); it goes with the namespace. The
    # last leader may not get to release it: helm deletes its RoleBinding and ServiceAccount in the
    # same breath as the Deployment, and a reinstall's replicas wait out one lease duration.
    leftovers = sorted(
        f"{item['kind']}/{item['metadata']['name']}"
        for item in local_cluster.get_json("all,serviceaccounts,roles,rolebindings,configmaps,secrets,leases,"
                                           "poddisruptionbudgets", namespace=release)["items"])
    assert leftovers == ["ConfigMap/kube-root-ca.crt", f"Lease/{leader.LEASE_NAME}", "ServiceAccount/default"]
