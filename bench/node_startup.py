"""How fast the process node turns scheduled pods into running processes and reports them.

    python bench/node_startup.py [--pods 100] [--nodes 1] [--pods-per-node 110] [--repeat 1] [--state-dir DIR]

Brings up a local cluster (control plane + one process-node daemon registering `--nodes`
nodes), creates `--pods` plain pods at once (a trivial container: the shell notes the time it
started and sleeps), and prints, over all pods, p50 / p99 / max in seconds of

  created -> scheduled    the scheduler (nodeName seen in a watch)
  scheduled -> started    the node: sandbox, volumes, launcher, until the command runs
                          (the container writes its own start time to a shared file)
  started -> Running      the node again: until the apiserver shows phase Running
  created -> Running      end to end

then deletes the pods and measures how long until every pod object is gone, and prints the
CPU seconds the node daemon used for all that, itself and its reaped children (`ip`
commands, launchers and the containers they became); these move least with other load on
the host. Times are wall-clock on this host
(the pods share its clock). The figure is the node's, not the operator's: no controller is
involved. Root is needed (the process node makes network namespaces).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from localcluster.cluster import NODE_RECORD, ClusterState, LocalCluster  # noqa: E402
from localcluster.node import NodeSpec  # noqa: E402
from localcluster.node.kubeapi import ApiError, KubeApi  # noqa: E402


def pod_manifest(name: str, marks: Path) -> dict[str, Any]:
    # `exec sleep`: the shell's start is the container's start; the pod stays Running until deleted.
    script = f'date +%s.%N > {marks}/"$HOSTNAME" && exec sleep 3600'
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "node-startup"}},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                 "automountServiceAccountToken": False,
                 "containers": [{"name": "main", "image": "none", "command": ["sh", "-c", script],
                                 "resources": {"requests": {"cpu": "1m", "memory": "1Mi"}}}]},
    }


class Watcher(threading.Thread):
    """Notes, per pod, when a watch first shows it scheduled and Running."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        super().__init__(daemon=True)
        self.api, self.namespace = api, namespace
        self.scheduled: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        version = self.api.get(path)["metadata"]["resourceVersion"]
        self.ready.set()
        while not self.stop.is_set():
            try:
                for event in self.api.watch(path, version, timeout_seconds=60):
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    now, name = time.time(), obj["metadata"]["name"]
                    if obj["spec"].get("nodeName"):
                        self.scheduled.setdefault(name, now)
                    if obj.get("status", {}).get("phase") == "Running":
                        self.running.setdefault(name, now)
                    if self.stop.is_set():
                        return
            except ApiError as error:
                if error.status == 410:
                    version = self.api.get(path)["metadata"]["resourceVersion"]


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):6.2f}  p99 {p99:6.2f}  max {ordered[-1]:6.2f}"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, reaped children's) user + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])  # after state, ppid, ...
    tick = os.sysconf("SC_CLK_TCK")
    return (utime + stime) / tick, (cutime + cstime) / tick


def run_once(api: KubeApi, pods: int, timeout: float, node_pid: int) -> dict[str, Any]:
    cpu_before = cpu_seconds(node_pid)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": namespace}})
    deadline = time.monotonic() + 60
    while True:  # pods are refused until the namespace's default ServiceAccount exists
        try:
            api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
            break
        except ApiError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    marks = Path(tempfile.mkdtemp(prefix="node-startup-"))
    marks.chmod(0o777)
    watcher = Watcher(api, namespace)
    watcher.start()
    watcher.ready.wait(30)
    names = [f"p{index:04d}" for index in range(pods)]
    created: dict[str, float] = {}

    def create(name: str) -> None:
        api.create(f"/api/v1/namespaces/{namespace}/pods", pod_manifest(name, marks))
        created[name] = time.time()

    began = time.time()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(create, names))
    creating = time.time() - began
    deadline = time.monotonic() + timeout
    while len(watcher.running) < pods and time.monotonic() < deadline:
        time.sleep(0.2)
    all_running = time.time() - began
    watcher.stop.set()
    started = {}
    for name in names:
        mark = marks / name
        if mark.exists() and mark.read_text().strip():
            started[name] = float(mark.read_text())
    result = {
        "pods": pods, "running": len(watcher.running), "all_running_s": round(all_running, 2),
        "create_all_s": round(creating, 2),
        "created->scheduled": [watcher.scheduled[n] - created[n] for n in names if n in watcher.scheduled],
        "scheduled->started": [started[n] - watcher.scheduled[n] for n in names
                               if n in started and n in watcher.scheduled],
        "started->Running": [watcher.running[n] - started[n] for n in names
                             if n in started and n in watcher.running],
        "created->Running": [watcher.running[n] - created[n] for n in names if n in watcher.running],
    }
    began = time.monotonic()
    api.request("DELETE", f"/api/v1/namespaces/{namespace}/pods",
                params={"labelSelector": "bench=node-startup"})
    while api.get(f"/api/v1/namespaces/{namespace}/pods")["items"]:
        if time.monotonic() - began > timeout:
            break
        time.sleep(0.2)
    result["delete_all_s"] = round(time.monotonic() - began, 2)
    cpu_after = cpu_seconds(node_pid)
    result["node_cpu_s"] = round(cpu_after[0] - cpu_before[0], 2)
    result["children_cpu_s"] = round(cpu_after[1] - cpu_before[1], 2)
    api.delete(f"/api/v1/namespaces/{namespace}")
    for mark in marks.iterdir():
        mark.unlink()
    marks.rmdir()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=1, help="nodes the one node daemon registers")
    parser.add_argument("--pods-per-node", type=int, default=110,
                        help="each node's pod capacity (kubelet's --max-pods; default 110)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for all pods to run (and to go)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="cluster state (default: a fresh temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the raw samples as JSON too")
    args = parser.parse_args(argv)
    if args.pods > args.pods_per_node * args.nodes:
        parser.error(f"--pods {args.pods}: {args.nodes} node(s) take {args.pods_per_node} pods "
                     "each; raise --nodes or --pods-per-node")
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="node-startup-cluster-"))
    nodes = [NodeSpec(f"localnode-{index}", pods=args.pods_per_node) for index in range(args.nodes)]
    cluster = LocalCluster(state_dir, nodes=nodes, log=lambda _: None)
    cluster.up()
    try:
        api = KubeApi(cluster.kubeconfig)
        state = ClusterState.load(cluster.state_dir)
        node_pid = next(r.pid for r in state.records() if r.name == NODE_RECORD)
        for attempt in range(args.repeat):
            result = run_once(api, args.pods, args.timeout, node_pid)
            print(f"run {attempt + 1}: {args.pods} pods on {args.nodes} node(s), created in "
                  f"{result['create_all_s']} s; {result['running']} Running after "
                  f"{result['all_running_s']} s; "
                  f"all deleted in {result['delete_all_s']} s; "
                  f"CPU: node daemon {result['node_cpu_s']} s, its children (ip, launchers, "
                  f"containers) {result['children_cpu_s']} s")
            for key in ("created->scheduled", "scheduled->started", "started->Running",
                        "created->Running"):
                print(f"  {key:20s} {percentiles(result[key])}")
            if args.json:
                print(json.dumps(result))
    finally:
        problems = cluster.down()
        if problems:
            print("cluster down left: " + "; ".join(problems), file=sys.stderr)
        elif args.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
