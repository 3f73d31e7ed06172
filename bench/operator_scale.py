"""The operator at scale on the local cluster, side by side with a peer on the same apiserver.

    python bench/operator_scale.py --jobs 100 --pods 4 [--peer indexed-job|pytorchjob|none]

Brings up its own local cluster (real etcd, kube-apiserver, controller-manager, scheduler and
process nodes, with an apiserver audit log), then for lorakube and for the peer in turn: creates
N jobs of P pods at once, waits for every pod to run, kills one pod's process in some jobs (a
crash), deletes every job, and prints one table row per system:

- created / Running: per job, from the job's first appearance in a watch to the last of its P pods
  appearing (created) or reported Running; p50 / p99 over the N jobs;
- failure -> new gang: from the kill to the last pod of the replacement gang appearing (the
  indexed Job and the PyTorchJob replace only the failed pod: that pod's replacement);
- pod DELETEs/restart: the controller's pod DELETE requests in the audit log from the first kill
  until the jobs are deleted, divided by the crashed jobs: P for lorakube, whose gang restart
  deletes each pod of the failed attempt once (more means a pod was asked for twice);
- delete -> gone: from the DELETE to the job object's DELETED event;
- API req/job: the controller's requests in the apiserver's audit log while the jobs ran (creation
  to all Running), divided by N; 409s are creates answered "already exists";
- controller CPU s / peak RSS: the operator process (for the peer: the whole
  kube-controller-manager, or the training-operator process).

The process node runs bench/noop_image/lorakube-train (`sleep`) as every pod's command, for both
systems, so the figures are the control plane's. Prints figures; asserts nothing about them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from localcluster import audit
from localcluster import kubeconfig as kubeconfig_mod
from localcluster.cluster import ClusterState, LocalCluster
from localcluster.node import NodeSpec
from lorakube_api import contract
from lorakube_dev import sandbox

HERE = Path(__file__).resolve().parent
NOOP_IMAGE = HERE / "noop_image"
# Pods per process node: below the node's 110-pod capacity, so scheduling never waits on room.
PODS_PER_NODE = 100
OPERATOR_USER = f"system:serviceaccount:{sandbox.OPERATOR_NAMESPACE}:{sandbox.OPERATOR_SERVICE_ACCOUNT}"
JOB_CONTROLLER_USER = "system:serviceaccount:kube-system:job-controller"
ADMIN_USER = "lorakube-admin"
PEER_CONTAINER = "trainer"
POD_REQUESTS = {"cpu": "10m", "memory": "16Mi"}


# --- figures --------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def spread(values: list[float], high: float = 0.99) -> str:
    """'p50/p99 s' (or p50/max), with how many were measured when some are missing."""
    if not values:
        return "-"
    return f"{percentile(values, 0.5):.2f}/{percentile(values, high):.2f}"


@dataclasses.dataclass
class Row:
    system: str
    shape: str
    created: list[float]
    running: list[float]
    regang: list[float]
    deleted: list[float]
    expected: int
    requests_per_job: float | None
    create_conflicts: str
    # Pod DELETEs the controller sent after the crashes (None: no audit log), and the crashes.
    restart_deletes: int | None
    crashes: int
    cpu_seconds: float | None
    peak_rss_mib: float | None
    breakdown: Counter

    def cells(self) -> list[str]:
        missing = self.expected - len(self.running)
        running = spread(self.running) + (f" ({missing} never)" if missing else "")
        return [self.system, self.shape, spread(self.created), running, spread(self.regang, 1.0),
                spread(self.deleted, 1.0),
                "-" if self.requests_per_job is None else f"{self.requests_per_job:.1f}",
                self.create_conflicts,
                "-" if self.restart_deletes is None or not self.crashes
                else f"{self.restart_deletes / self.crashes:.1f}",
                "-" if self.cpu_seconds is None else f"{self.cpu_seconds:.1f}",
                "-" if self.peak_rss_mib is None else f"{self.peak_rss_mib:.0f}"]


HEADER = ["system", "jobs x pods", "created p50/p99 s", "Running p50/p99 s", "failure->new gang p50/max s",
          "delete->gone p50/max s", "API req/job", "pod creates 409", "pod DELETEs/restart", "controller CPU s",
          "peak RSS MiB"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


# --- watching -------------------------------------------------------------------------------


class Watcher:
    """First-seen times of the jobs and pods of one namespace, from watches (the bench's clock)."""

    def __init__(self, namespace: str, list_jobs: Callable[..., Any], job_of_pod: Callable[[Any], str | None],
                 core: client.CoreV1Api) -> None:
        self.namespace = namespace
        self.lock = threading.Lock()
        self.job_seen: dict[str, float] = {}
        self.job_gone: dict[str, float] = {}
        # pod uid -> (job, pod name, first seen, first seen Running)
        self.pods: dict[str, list[Any]] = {}
        self.pod_running: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(list_jobs, self._on_job), daemon=True),
            threading.Thread(target=self._loop, args=(lambda **kw: core.list_namespaced_pod(namespace, **kw),
                                                       self._on_pod), daemon=True),
        ]
        self._job_of_pod = job_of_pod
        for thread in self._threads:
            thread.start()

    def _loop(self, lister: Callable[..., Any], handle: Callable[[str, Any], None]) -> None:
        version = None
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                kwargs = {"timeout_seconds": 60, "allow_watch_bookmarks": True}
                if version:
                    kwargs["resource_version"] = version
                for event in stream.stream(lister, **kwargs):
                    if self._stop.is_set():
                        stream.stop()
                        break
                    if event["type"] == "ERROR":
                        raise ApiException(status=(event.get("raw_object") or {}).get("code"))
                    # Plain dicts for every kind (the client hands custom objects back as dicts).
                    obj = event["object"]
                    obj = obj if isinstance(obj, dict) else client.ApiClient().sanitize_for_serialization(obj)
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        handle(event["type"], obj)
            except ApiException as exc:
                if exc.status == 410:
                    version = None  # relist; first-seen times already recorded stay
                time.sleep(0.2)
            except Exception as exc:  # noqa: BLE001 - a dropped connection: watch again from the last version
                print(f"watch in {self.namespace}: {exc!r}; watching again", file=sys.stderr)
                time.sleep(0.2)

    def _on_job(self, kind: str, obj: Any) -> None:
        name = obj["metadata"]["name"]
        now = time.time()
        with self.lock:
            self.job_seen.setdefault(name, now)
            if kind == "DELETED":
                self.job_gone.setdefault(name, now)

    def _on_pod(self, kind: str, pod: Any) -> None:
        now = time.time()
        job = self._job_of_pod(pod)
        if job is None:
            return
        with self.lock:
            uid = pod["metadata"]["uid"]
            self.pods.setdefault(uid, [job, pod["metadata"]["name"], now])
            if (pod.get("status") or {}).get("phase") == "Running":
                self.pod_running.setdefault(uid, now)

    def stop(self) -> None:
        self._stop.set()

    def gang(self, job: str, after: float = 0.0) -> list[tuple[str, str, float, float | None]]:
        """(uid, name, seen, running) of the job's pods first seen after `after`."""
        with self.lock:
            return [(uid, name, seen, self.pod_running.get(uid)) for uid, (owner, name, seen) in self.pods.items()
                    if owner == job and seen >= after]


# --- the systems ----------------------------------------------------------------------------


@dataclasses.dataclass
class System:
    """How the bench drives one system: its jobs, how a pod names its job, whose requests count."""

    name: str
    user: str
    pid: Callable[[], int | None]
    manifest: Callable[[str, int], dict[str, Any]]
    create: Callable[[str, dict[str, Any]], None]
    delete: Callable[[str, str], None]
    list_jobs: Callable[[str], Callable[..., Any]]
    job_of_pod: Callable[[Any], str | None]
    # A new gang replaces every pod (lorakube); an indexed Job and a PyTorchJob only the failed one.
    whole_gang: bool = True
    container: str = PEER_CONTAINER
    # Only this user's requests whose user agent starts so (a peer running as the admin, as the bench does).
    user_agent: str | None = None
    stop: Callable[[], None] = lambda: None


def lorakube_manifest(name: str, pods: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"family": "flux", "uri": "/data/model"},
            "dataset": {"uri": "/data/dataset"},
            "training": {"height": 64, "width": 64, "maxEpochs": 1, "precision": "32", "strategy": "ddp"},
            "resources": {"numNodes": pods, "gpusPerNode": 0, "resources": {"requests": POD_REQUESTS}},
            "output": {"uri": f"/data/output/{name}"},
            # Restart at once, and often: the bench crashes pods on purpose. A slow node may take
            # longer than the default 600 s to start thousands of pods: that is not a failure here.
            "runPolicy": {"maxRestarts": 100, "backoffSeconds": 0, "startupDeadlineSeconds": 3600},
        },
    }


def indexed_job_manifest(name: str, pods: int) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed", "completions": pods, "parallelism": pods, "backoffLimit": 100,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": PEER_CONTAINER, "image": "lorakube/trainer:latest",
                                "command": [contract.TRAINER_COMMAND],
                                "resources": {"requests": POD_REQUESTS}}],
            }},
        },
    }


def lorakube_system(api: client.ApiClient, operator: sandbox.OperatorProcess) -> System:
    custom = client.CustomObjectsApi(api)
    group, version, plural = contract.API_GROUP, contract.API_VERSION, contract.PLURAL

    def labels_job(pod: Any) -> str | None:
        return (pod["metadata"].get("labels") or {}).get(contract.LABEL_JOB_NAME)

    return System(
        name="lorakube",
        user=OPERATOR_USER,
        pid=lambda: operator.process.pid if operator.running else None,
        manifest=lorakube_manifest,
        create=lambda ns, body: custom.create_namespaced_custom_object(group, version, ns, plural, body),
        delete=lambda ns, name: custom.delete_namespaced_custom_object(group, version, ns, plural, name),
        list_jobs=lambda ns: (lambda **kw: custom.list_namespaced_custom_object(group, version, ns, plural, **kw)),
        job_of_pod=labels_job,
        container=contract.TRAINER_CONTAINER,
    )


def indexed_job_system(api: client.ApiClient, state_dir: Path) -> System:
    batch = client.BatchV1Api(api)
    controller_manager = (ClusterState.load(state_dir).daemons or {}).get("kube-controller-manager", {})

    return System(
        name="indexed Job (kube-controller-manager)",
        user=JOB_CONTROLLER_USER,
        pid=lambda: controller_manager.get("pid"),
        manifest=indexed_job_manifest,
        create=lambda ns, body: batch.create_namespaced_job(ns, body),
        delete=lambda ns, name: batch.delete_namespaced_job(name, ns, propagation_policy="Background"),
        list_jobs=lambda ns: (lambda **kw: batch.list_namespaced_job(ns, **kw)),
        job_of_pod=lambda pod: (pod["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name"),
        whole_gang=False,
    )


def pytorchjob_system(api: client.ApiClient, cluster: LocalCluster, work: Path,
                      log: Callable[[str], None]) -> System:
    """Kubeflow's training-operator (PyTorchJob), built and started by localcluster.training_operator.
    It runs with the admin kubeconfig (as the control plane does), so its requests are told from
    the bench's own by their user agent. restartPolicy ExitCode: the controller itself replaces a
    pod that died of a retryable exit code (137), the one failed pod, not the whole gang."""
    try:
        from localcluster import training_operator  # type: ignore[attr-defined]
    except ImportError:
        raise SystemExit("--peer pytorchjob needs localcluster/training_operator.py (the training-operator "
                         "build); use --peer indexed-job") from None

    def kubectl(*args: str, input: str | None = None, check: bool = False) -> Any:
        result = cluster.kubectl(*args, input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    running = training_operator.install(kubectl, cluster.kubeconfig, work / "training-operator", log=log)
    custom = client.CustomObjectsApi(api)
    group, version, plural = "kubeflow.org", "v1", "pytorchjobs"

    def manifest(name: str, pods: int) -> dict[str, Any]:
        body = training_operator.pytorchjob_manifest(name, "", pods, "lorakube/trainer:latest",
                                                     [contract.TRAINER_COMMAND], restart_policy="ExitCode")
        body["metadata"].pop("namespace", None)
        for container in body["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]:
            container["resources"] = {"requests": POD_REQUESTS}
        return body

    return System(
        name="PyTorchJob (training-operator v1.8.1)",
        user=ADMIN_USER,
        user_agent="training-operator",
        pid=lambda: running.pid,
        manifest=manifest,
        create=lambda ns, body: custom.create_namespaced_custom_object(group, version, ns, plural, body),
        delete=lambda ns, name: custom.delete_namespaced_custom_object(group, version, ns, plural, name),
        list_jobs=lambda ns: (lambda **kw: custom.list_namespaced_custom_object(group, version, ns, plural, **kw)),
        job_of_pod=lambda pod: (pod["metadata"].get("labels") or {}).get("training.kubeflow.org/job-name"),
        whole_gang=False,
        container="pytorch",
        stop=lambda: training_operator.uninstall(running, kubectl),
    )


# --- one run --------------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        return None
    return None


def kill_pod(node_state: Path, uid: str, container: str) -> bool:
    """SIGKILL a pod's container process (the node records its pid): a crash, exit 137."""
    record = node_state / "procs" / f"{uid}_{container}.json"
    try:
        os.kill(int(json.loads(record.read_text())["pid"]), signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        return False
    return True


def wait_until(done: Callable[[], bool], timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def run_system(system: System, api: client.ApiClient, cluster: LocalCluster, jobs: int, pods: int,
               failures: int, timeout: float, log: Callable[[str], None]) -> Row:
    core = client.CoreV1Api(api)
    namespace = cluster_namespace(cluster, f"bench-{system.name.split()[0].lower()}-{int(time.time())}")
    watcher = Watcher(namespace, system.list_jobs(namespace), system.job_of_pod, core)
    names = [f"j{index:04d}" for index in range(jobs)]
    time.sleep(1.0)  # the watches are open before the first job exists
    cpu_before = cpu_seconds(system.pid())
    start = time.time()
    log(f"{system.name}: creating {jobs} jobs x {pods} pods in {namespace}")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: system.create(namespace, system.manifest(name, pods)), names))

    def all_running() -> bool:
        return all(sum(1 for *_, running in watcher.gang(name) if running) >= pods for name in names)

    if not wait_until(all_running, timeout):
        log(f"{system.name}: not every pod Running after {timeout:.0f} s")
    settled = time.time()
    created, running = [], []
    for name in names:
        gang = watcher.gang(name)
        seen = watcher.job_seen.get(name)
        if seen is None or len(gang) < pods:
            continue
        created.append(max(g[2] for g in gang) - seen)
        if all(g[3] for g in gang):
            running.append(max(g[3] for g in gang) - seen)

    def controller_requests(since: float, until: float) -> list[dict[str, Any]]:
        return [e for e in audit.requests(cluster.layout.audit_log, system.user, since, until)
                if system.user_agent is None or e.get("userAgent", "").startswith(system.user_agent)]

    calm_requests = controller_requests(start, settled)

    # Crash one pod of some jobs at once; time until the replacement gang exists.
    victims = {}
    for name in names[:failures]:
        gang = sorted(watcher.gang(name), key=lambda g: g[1])
        if gang and kill_pod(cluster.node_state_dir, gang[0][0], system.container):
            victims[name] = time.time()
    replaced_need = pods if system.whole_gang else 1
    wait_until(lambda: all(len(watcher.gang(name, killed)) >= replaced_need for name, killed in victims.items()),
               min(timeout, 300.0))
    regang = [max(g[2] for g in watcher.gang(name, killed)) - killed for name, killed in victims.items()
              if len(watcher.gang(name, killed)) >= replaced_need]
    log(f"{system.name}: {len(regang)}/{len(victims)} crashed jobs got a new gang")

    # Delete every job; time until each object is gone.
    wait_until(lambda: all(len([g for g in watcher.gang(n, k) if g[3]]) >= replaced_need
                           for n, k in victims.items()), 60.0)
    # The restarts' pod DELETEs: from the first kill until the jobs' own deletion begins.
    restart_deletes = sum(1 for e in controller_requests(min(victims.values(), default=time.time()), time.time())
                          if e["verb"] == "delete" and e.get("objectRef", {}).get("resource") == "pods")
    asked = {}
    for name in names:
        asked[name] = time.time()
        system.delete(namespace, name)
    wait_until(lambda: all(name in watcher.job_gone for name in names), min(timeout, 300.0))
    deleted = [watcher.job_gone[name] - asked[name] for name in names if name in watcher.job_gone]
    pid = system.pid()
    cpu_after = cpu_seconds(pid)
    watcher.stop()
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")

    creates = [e for e in calm_requests if e["verb"] == "create" and e.get("objectRef", {}).get("resource") == "pods"]
    refused = sum(1 for e in creates if e.get("responseStatus", {}).get("code") == 409)
    breakdown = Counter(audit.describe(e) for e in calm_requests)
    return Row(
        system=system.name, shape=f"{jobs} x {pods}", created=created, running=running, regang=regang,
        deleted=deleted, expected=jobs,
        requests_per_job=len(calm_requests) / jobs if cluster.layout.audit_log.exists() else None,
        create_conflicts=f"{refused}/{len(creates)}",
        restart_deletes=restart_deletes if cluster.layout.audit_log.exists() else None, crashes=len(victims),
        cpu_seconds=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
        peak_rss_mib=peak_rss_mib(pid), breakdown=breakdown,
    )


def cluster_namespace(cluster: LocalCluster, name: str) -> str:
    cluster.kubectl("create", "namespace", name)
    wait_until(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name).returncode == 0, 60, 0.2)
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10, help="N jobs created at once (default 10)")
    parser.add_argument("--pods", type=int, default=4, help="P pods per job (default 4)")
    parser.add_argument("--peer", choices=["indexed-job", "pytorchjob", "none"], default="indexed-job")
    parser.add_argument("--failures", type=int, default=None,
                        help="jobs whose rank-0 pod is crashed (default min(N, 10))")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for all pods Running")
    parser.add_argument("--state-dir", type=Path, default=None, help="the bench cluster's state (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    failures = min(args.jobs, 10) if args.failures is None else args.failures

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    state_dir = args.state_dir or work / "cluster"
    node_count = max(1, math.ceil(args.jobs * args.pods / PODS_PER_NODE))
    # Capacity never binds: the figures are about reacting, not packing.
    nodes = [NodeSpec(f"benchnode-{index}", cpu="1000", memory="4000Gi") for index in range(node_count)]
    users = [OPERATOR_USER, JOB_CONTROLLER_USER] + ([ADMIN_USER] if args.peer == "pytorchjob" else [])
    cluster = LocalCluster(state_dir, nodes=nodes, log=log, node_path=[NOOP_IMAGE], node_env={},
                           audit_policy=audit.write_policy(work / "audit-policy.yaml", users))
    rows: list[Row] = []
    operator = None
    try:
        cluster.up()
        api = config.new_client_from_config(str(cluster.kubeconfig))
        sandbox.install(cluster.kubectl, "bench-setup")
        token = sandbox.operator_token(cluster.kubectl)
        operator_config = kubeconfig_mod.write_for_token(work / "operator.kubeconfig", cluster.server,
                                                         cluster.ca_file, "lorakube-operator", token)
        operator = sandbox.OperatorProcess(operator_config, work / "operator.log").start()
        time.sleep(3.0)  # the operator's watches are open
        rows.append(run_system(lorakube_system(api, operator), api, cluster, args.jobs, args.pods, failures,
                               args.timeout, log))
        operator.stop()
        if args.peer == "indexed-job":
            rows.append(run_system(indexed_job_system(api, state_dir), api, cluster, args.jobs, args.pods,
                                   failures, args.timeout, log))
        elif args.peer == "pytorchjob":
            peer = pytorchjob_system(api, cluster, work, log)
            try:
                rows.append(run_system(peer, api, cluster, args.jobs, args.pods, failures, args.timeout, log))
            finally:
                peer.stop()
    finally:
        if operator is not None:
            operator.stop()
        cluster.down()
    load = os.getloadavg()
    print(f"\n{args.jobs} jobs x {args.pods} pods, {node_count} process node(s), {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, {failures} crashed job(s)\n")
    print(table(rows))
    for row in rows:
        top = ", ".join(f"{what} {count}" for what, count in row.breakdown.most_common(12))
        print(f"\n{row.system} requests until all Running: {top}")
    if args.json:
        args.json.write_text(json.dumps([{**dataclasses.asdict(r), "breakdown": dict(r.breakdown)} for r in rows],
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
