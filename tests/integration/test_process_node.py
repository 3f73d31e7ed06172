"""The process node against the real control plane: pods run as local processes in their own
network and mount namespaces, report status like kubelet, and leave nothing behind.

Every assertion is what a user would check with kubectl: phase, exit code, logs, pod gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from localcluster.node import NodeSpec, start_node_daemon, stop_node_daemon
from localcluster.node import hostregistry
from localcluster.node.layout import StateLayout
from localcluster.node.network import BRIDGE, bridge_ports, pod_net_for
from localcluster.pytest_plugin import NODE_RESTART_BACKOFF, wait_for

pytestmark = pytest.mark.cluster


# -- helpers -----------------------------------------------------------------------------------
def pod(cluster: Any, ns: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json")
    return json.loads(result.stdout) if result.returncode == 0 else None


def wait_phase(cluster: Any, ns: str, name: str, phases: tuple[str, ...],
               timeout: float = 60.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = pod(cluster, ns, name)
        return obj if obj and obj.get("status", {}).get("phase") in phases else None

    try:
        return wait_for(f"pod {ns}/{name} to reach {phases}", reached, timeout)
    except pytest.fail.Exception:
        current = pod(cluster, ns, name)
        raise AssertionError(f"pod {name} never reached {phases}: "
                             f"{json.dumps((current or {}).get('status'), indent=1)}") from None


def python_pod(name: str, script: str, **extra: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "python:3.11",
                                 "command": ["python", "-c", textwrap.dedent(script)]}
    container.update(extra.pop("container", {}))
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container],
                            "terminationGracePeriodSeconds": 20}
    spec.update(extra.pop("spec", {}))
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, **extra.pop("metadata", {})}, "spec": spec}


def logs(cluster: Any, ns: str, name: str) -> str:
    return cluster.kubectl("logs", name, "-n", ns, check=True).stdout


def pid_of(obj: dict[str, Any]) -> int:
    status = obj["status"]["containerStatuses"][0]
    container_id = status.get("containerID") or status["state"]["terminated"]["containerID"]
    return int(container_id.removeprefix("process://"))


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- tests -------------------------------------------------------------------------------------

def test_pod_runs_to_succeeded_with_logs(local_cluster: Any, new_namespace: str) -> None:
    ns = new_namespace
    local_cluster.apply(python_pod("hello", "print('starting')\nprint('hello from a process pod')"),
                        ns)

    obj = wait_phase(local_cluster, ns, "hello", ("Succeeded", "Failed"))

    status = obj["status"]
    assert status["phase"] == "Succeeded"
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert terminated["startedAt"] and terminated["finishedAt"]
    assert re.fullmatch(r"10\.250\.\d+\.\d+", status["podIP"]) and status["hostIP"]
    assert "hello from a process pod" in logs(local_cluster, ns, "hello")
    tail = local_cluster.kubectl("logs", "hello", "-n", ns, "--tail=1", check=True).stdout
    assert tail.strip() == "hello from a process pod"
    fallback = subprocess.run(
        [sys.executable, "-m", "localcluster.node", "logs", ns, "hello",
         "--state-dir", str(local_cluster.state_dir)], capture_output=True, text=True)
    assert fallback.returncode == 0 and "hello from a process pod" in fallback.stdout


def test_nonzero_exit_fails_the_pod_with_its_code(local_cluster: Any, new_namespace: str) -> None:
    ns = new_namespace
    local_cluster.apply(python_pod("exit3", "import sys; print('bad input'); sys.exit(3)",
                                   container={"terminationMessagePolicy": "FallbackToLogsOnError"}),
                        ns)

    status = wait_phase(local_cluster, ns, "exit3", ("Succeeded", "Failed"))["status"]

    assert status["phase"] == "Failed"
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert "bad input" in terminated["message"]
    assert "exited with code 3" in status["message"]


def test_downward_api_env_and_private_volume_mounts(local_cluster: Any, new_namespace: str,
                                                    tmp_path: Path) -> None:
    ns = new_namespace
    results = tmp_path / "results"
    mount_point = f"/lk-results-{ns}"  # does not exist on the host
    local_cluster.apply([{"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": "settings"}, "data": {"greeting": "hi"}},
                         {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
                          "stringData": {"token": "s3cret"}}], ns)
    script = f"""
        import json, os, socket
        with open('{mount_point}/seen.json', 'w') as f:
            json.dump({{k: os.environ.get(k) for k in
                       ('POD_NAME', 'POD_NAMESPACE', 'TEAM', 'NODE', 'GREETING', 'MESSAGE')}}
                      | {{'hostname': socket.gethostname(), 'cwd': os.getcwd(),
                         'init': open('/scratch/from-init').read(),
                         'secret': open('/creds/token').read()}}, f)
    """
    manifest = python_pod(
        "downward", script,
        metadata={"annotations": {"lorakube.io/team": "vision"}},
        container={
            "workingDir": "/scratch",
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "TEAM", "valueFrom": {"fieldRef": {
                    "fieldPath": "metadata.annotations['lorakube.io/team']"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings",
                                                                       "key": "greeting"}}},
                {"name": "MESSAGE", "value": "$(GREETING) from $(POD_NAME), $$(NOT_EXPANDED)"},
            ],
            "volumeMounts": [{"name": "out", "mountPath": mount_point},
                             {"name": "scratch", "mountPath": "/scratch"},
                             {"name": "creds", "mountPath": "/creds", "readOnly": True}],
        },
        spec={"volumes": [{"name": "out", "hostPath": {"path": str(results),
                                                       "type": "DirectoryOrCreate"}},
                          {"name": "scratch", "emptyDir": {}},
                          {"name": "creds", "secret": {"secretName": "creds"}}],
              "initContainers": [{
                  "name": "prepare", "image": "busybox",
                  "command": ["sh", "-c", "echo prepared > /scratch/from-init"],
                  "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}]},
    )
    local_cluster.apply(manifest, ns)

    status = wait_phase(local_cluster, ns, "downward", ("Succeeded", "Failed"))["status"]

    assert status["phase"] == "Succeeded", logs(local_cluster, ns, "downward")
    seen = json.loads((results / "seen.json").read_text())
    assert seen["POD_NAME"] == "downward" and seen["POD_NAMESPACE"] == ns
    assert seen["TEAM"] == "vision" and seen["NODE"].startswith("localnode-")
    assert seen["MESSAGE"] == "hi from downward, $(NOT_EXPANDED)"
    assert seen["hostname"] == "downward" and seen["cwd"] == "/scratch"
    assert seen["init"] == "prepared\n" and seen["secret"] == "s3cret"
    init_state = status["initContainerStatuses"][0]["state"]["terminated"]
    assert init_state["exitCode"] == 0
    # The pod's mounts lived in its own mount namespace: the host path stays an empty dir.
    assert not Path(mount_point).exists() or not any(Path(mount_point).iterdir())


def test_memory_emptydir_at_dev_shm_is_private_to_the_pod(local_cluster: Any, new_namespace: str) -> None:
    # Every lorakube pod mounts a Memory emptyDir at /dev/shm (NCCL, DataLoader workers). On the
    # process node it is the pod's own directory bound over /dev/shm in the pod's mount namespace:
    # POSIX shared memory works there, and the host's /dev/shm never sees it.
    ns = new_namespace
    marker = f"lorakube-shm-test-{ns}"
    script = f"""
        from multiprocessing import shared_memory
        block = shared_memory.SharedMemory(name='{marker}', create=True, size=1 << 20)
        block.buf[:5] = b'hello'
        again = shared_memory.SharedMemory(name='{marker}')
        assert bytes(again.buf[:5]) == b'hello'
        import os
        open('/dev/shm/{marker}.file', 'w').close()   # outlives the process, unlike the block
        print('in pod:', sorted(os.listdir('/dev/shm')), flush=True)
        again.close()
        block.close()
        block.unlink()
    """
    local_cluster.apply(python_pod(
        "shm", script,
        container={"volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]},
        spec={"volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}]},
    ), ns)

    status = wait_phase(local_cluster, ns, "shm", ("Succeeded", "Failed"))["status"]

    out = logs(local_cluster, ns, "shm")
    assert status["phase"] == "Succeeded", out
    assert f"in pod: ['{marker}', '{marker}.file']" in out, out
    assert not (Path("/dev/shm") / f"{marker}.file").exists()


SERVER = """
    import socket, sys
    srv = socket.create_server(('0.0.0.0', 29500))
    conn, _ = srv.accept()
    message = conn.recv(1024).decode()
    print('server got:', message, flush=True)
    conn.sendall(('pong to ' + message).encode())
    conn.close()
"""

CLIENT = """
    import os, socket, sys, time
    target = 'server.{job}.' + os.environ['NS'] + '.svc'
    deadline = time.time() + 60
    while True:
        try:
            conn = socket.create_connection((target, 29500), timeout=5)
            break
        except OSError as exc:
            if time.time() > deadline:
                sys.exit(f'cannot reach {{target}}: {{exc}}')
            time.sleep(0.3)
    conn.sendall(b'{job}')
    print('client got:', conn.recv(1024).decode(), 'via', socket.gethostbyname(target), flush=True)
"""


def test_two_pairs_talk_over_headless_service_names_on_one_port(local_cluster: Any,
                                                                 new_namespace: str) -> None:
    ns = new_namespace
    ns_env = {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    for job in ("job-a", "job-b"):
        local_cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": job},
                             "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                                      "selector": {"job": job},
                                      "ports": [{"name": "c10d", "port": 29500}]}}, ns)
        for role, script in (("server", SERVER), ("client", CLIENT.format(job=job))):
            local_cluster.apply(python_pod(
                f"{job}-{role}", script,
                metadata={"labels": {"job": job}},
                spec={"hostname": role, "subdomain": job},
                container={"env": [ns_env]}), ns)

    for job in ("job-a", "job-b"):
        for role in ("server", "client"):
            status = wait_phase(local_cluster, ns, f"{job}-{role}", ("Succeeded", "Failed"),
                                timeout=90)["status"]
            assert status["phase"] == "Succeeded", logs(local_cluster, ns, f"{job}-{role}")
        server_ip = pod(local_cluster, ns, f"{job}-server")["status"]["podIP"]
        assert f"server got: {job}" in logs(local_cluster, ns, f"{job}-server")
        assert f"client got: pong to {job} via {server_ip}" in logs(local_cluster, ns,
                                                                    f"{job}-client")


SIGTERM_WATCHER = """
    import signal, sys, time
    def on_term(signum, frame):
        open('/marks/terminated', 'w').write('SIGTERM')
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print('ready', flush=True)
    while True:
        time.sleep(0.2)
"""


def test_deleting_a_running_pod_sends_sigterm_and_removes_it(local_cluster: Any,
                                                            new_namespace: str,
                                                            tmp_path: Path) -> None:
    ns = new_namespace
    marks = tmp_path / "marks"
    local_cluster.apply(python_pod(
        "victim", SIGTERM_WATCHER,
        container={"volumeMounts": [{"name": "marks", "mountPath": "/marks"}]},
        spec={"volumes": [{"name": "marks", "hostPath": {"path": str(marks),
                                                         "type": "DirectoryOrCreate"}}]}), ns)
    obj = wait_phase(local_cluster, ns, "victim", ("Running",))
    wait_for("the pod to print ready", lambda: "ready" in logs(local_cluster, ns, "victim"))
    pid = pid_of(obj)
    assert pid_alive(pid)

    started = time.monotonic()
    local_cluster.kubectl("delete", "pod", "victim", "-n", ns, "--wait=false", check=True)
    wait_for("the pod object to disappear", lambda: pod(local_cluster, ns, "victim") is None,
             timeout=30)

    assert (marks / "terminated").read_text() == "SIGTERM"
    assert not pid_alive(pid)
    events = local_cluster.get_json("events", "--field-selector", "involvedObject.name=victim",
                                    namespace=ns)["items"]
    assert {"Started", "Killing"} <= {e["reason"] for e in events}
    assert time.monotonic() - started < 15, "SIGTERM was not delivered before the grace period"


def test_owner_deletion_garbage_collects_the_pod(local_cluster: Any, new_namespace: str) -> None:
    ns = new_namespace
    local_cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, ns)
    owner_uid = local_cluster.get_json("configmap", "owner", namespace=ns)["metadata"]["uid"]
    local_cluster.apply(python_pod(
        "owned", "import time\nwhile True: time.sleep(0.2)",
        metadata={"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                       "uid": owner_uid}]}), ns)
    pid = pid_of(wait_phase(local_cluster, ns, "owned", ("Running",)))

    local_cluster.kubectl("delete", "configmap", "owner", "-n", ns, check=True)

    wait_for("the owned pod to be garbage-collected",
             lambda: pod(local_cluster, ns, "owned") is None, timeout=60)
    wait_for("its process to end", lambda: not pid_alive(pid), timeout=10)


IN_CLUSTER = """
    import json
    from kubernetes import client, config
    config.load_incluster_config()
    api = client.CoreV1Api()
    ns = open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read()
    names = [c.metadata.name for c in api.list_namespaced_config_map(ns).items]
    try:
        api.list_namespaced_secret(ns)
        secrets = 'allowed'
    except client.ApiException as exc:
        secrets = exc.status
    # The kubelet API shares the gateway address but wants a cluster client certificate.
    # Its port is the one our Node advertises (another cluster's node may hold 10250).
    import os, socket, ssl, urllib.request
    port = int(os.environ['KUBELET_PORT'])
    socket.create_connection(('10.250.0.1', port), timeout=5).close()
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    try:
        urllib.request.urlopen(f'https://10.250.0.1:{port}/containerLogs/{ns}/incluster/main',
                               context=insecure, timeout=5)
        kubelet = 'open'
    except Exception as exc:
        kubelet = 'refused: ' + type(exc).__name__
    print(json.dumps({'configmaps': names, 'secrets': secrets, 'kubelet': kubelet}), flush=True)
"""


def test_in_cluster_service_account_token_through_the_forwarder(local_cluster: Any,
                                                               new_namespace: str) -> None:
    ns = new_namespace
    local_cluster.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "read-configmaps"},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "reader-reads-configmaps"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": "read-configmaps"},
         "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "visible"}},
    ], ns)
    node = local_cluster.get_json("nodes")["items"][0]
    kubelet_port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    local_cluster.apply(python_pod(
        "incluster", IN_CLUSTER,
        container={"env": [{"name": "KUBELET_PORT", "value": str(kubelet_port)}]},
        spec={"serviceAccountName": "reader", "nodeName": node["metadata"]["name"]}), ns)

    status = wait_phase(local_cluster, ns, "incluster", ("Succeeded", "Failed"),
                        timeout=90)["status"]

    output = logs(local_cluster, ns, "incluster")
    assert status["phase"] == "Succeeded", output
    seen = json.loads(output.strip().splitlines()[-1])
    assert "visible" in seen["configmaps"]
    assert seen["secrets"] == 403
    assert seen["kubelet"].startswith("refused")


def test_processes_that_escape_the_process_group_end_with_the_pod(local_cluster: Any,
                                                                   new_namespace: str) -> None:
    ns = new_namespace
    script = """
        import subprocess
        child = subprocess.Popen(['sleep', '300'], start_new_session=True)
        print(child.pid, flush=True)
    """
    local_cluster.apply(python_pod("escaper", script), ns)

    assert wait_phase(local_cluster, ns, "escaper", ("Succeeded", "Failed"))["status"]["phase"] \
        == "Succeeded"
    escaped = int(logs(local_cluster, ns, "escaper").split()[0])
    wait_for("the escaped process to be killed", lambda: not pid_alive(escaped), timeout=10)


# -- stop and restart (last: they restart the session's node) --------------------------------

def _node_specs(cluster: Any) -> list[NodeSpec]:
    nodes = cluster.get_json("nodes")["items"]
    return [NodeSpec(name=n["metadata"]["name"],
                     gpus=int(n["status"]["capacity"].get("nvidia.com/gpu", 0))) for n in nodes]


def _restart_node(cluster: Any, nodes: list[NodeSpec]) -> None:
    start_node_daemon(cluster.kubeconfig, cluster.state_dir, nodes,
                      restart_backoff=NODE_RESTART_BACKOFF)
    for node in nodes:
        cluster.kubectl("wait", "--for=condition=Ready", f"node/{node.name}", "--timeout=60s",
                        check=True)


def _pod_devices(ip: str) -> dict[str, int]:
    """What identifies a pod's network devices beyond their names: the names derive from
    the IP, and IPs are handed out lowest-free host-wide, so another cluster on this host
    may reuse the names right after this node freed them. The host end's ifindex is never
    reused soon (allocated cyclically), the netns is its nsfs inode."""
    net = pod_net_for(ip)
    return {"netns": net.netns_path.stat().st_ino,
            "veth": int(Path(f"/sys/class/net/{net.veth}/ifindex").read_text())}


def _host_leftovers(state_dir: Path, pods: dict[str, dict[str, int]]) -> list[str]:
    """This node's devices, mounts and IP table entries that survived its stop (`pods`:
    pod IP -> `_pod_devices` recorded while the pod ran). The bridge counts only when no
    other node daemon (another cluster on this host) is alive."""
    owner = hostregistry.owner_id(state_dir)
    found, namespaces = [], []
    for ip, recorded in pods.items():
        net = pod_net_for(ip)
        with contextlib.suppress(OSError):
            if int(Path(f"/sys/class/net/{net.veth}/ifindex").read_text()) == recorded["veth"]:
                found.append(f"link {net.veth}")
        with contextlib.suppress(OSError):
            if net.netns_path.stat().st_ino == recorded["netns"]:
                namespaces.append((ip, net.netns))
    # A netns inode may be reused, but no daemon is given an IP whose netns still exists:
    # a namespace of that name whose IP another daemon holds (read after the namespace was
    # seen) is that daemon's, not a leftover of ours.
    table = hostregistry.ip_table()
    found += [f"netns {netns}" for ip, netns in namespaces
              if table.get(ip, {}).get("owner", owner) == owner]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    if BRIDGE in names and not hostregistry.live_daemons() and not bridge_ports():
        found.append(f"bridge {BRIDGE}")
    found += [f"pod IP {ip}" for ip, entry in table.items() if entry["owner"] == owner]
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            text = mountinfo.read_text()
        except OSError:
            continue
        if str(StateLayout(state_dir).root) in text:
            found.append(f"mount in pid {mountinfo.parent.name}")
    return found


def test_stop_node_daemon_terminates_pods_and_cleans_the_host(local_cluster: Any,
                                                              new_namespace: str) -> None:
    ns = new_namespace
    nodes = _node_specs(local_cluster)
    local_cluster.apply(python_pod("sleeper", "import time\nwhile True: time.sleep(0.2)"), ns)
    running = wait_phase(local_cluster, ns, "sleeper", ("Running",))
    pid = pid_of(running)
    devices = {running["status"]["podIP"]: _pod_devices(running["status"]["podIP"])}

    stop_node_daemon(local_cluster.state_dir)
    try:
        assert not pid_alive(pid)
        assert _host_leftovers(local_cluster.state_dir, devices) == []
        status = pod(local_cluster, ns, "sleeper")["status"]
        assert status["phase"] == "Failed"
        assert any(c["type"] == "DisruptionTarget" and c["status"] == "True"
                   for c in status["conditions"])
        assert local_cluster.get_json("nodes")["items"] == []
    finally:
        _restart_node(local_cluster, nodes)


def test_node_restart_after_a_crash_fails_lost_pods_and_kills_leftovers(local_cluster: Any,
                                                                        new_namespace: str) -> None:
    ns = new_namespace
    nodes = _node_specs(local_cluster)
    local_cluster.apply(python_pod("orphan", "import time\nwhile True: time.sleep(0.2)"), ns)
    pid = pid_of(wait_phase(local_cluster, ns, "orphan", ("Running",)))
    daemon_pid = json.loads(StateLayout(local_cluster.state_dir).pidfile.read_text())["pid"]

    os.kill(daemon_pid, 9)  # a crash: no chance to clean up
    wait_for("the daemon to die", lambda: not pid_alive(daemon_pid), timeout=10)
    assert pid_alive(pid), "pod processes run in their own sessions and outlive a crash"
    _restart_node(local_cluster, nodes)

    wait_for("the leftover pod process to be killed", lambda: not pid_alive(pid), timeout=10)
    status = wait_phase(local_cluster, ns, "orphan", ("Failed",), timeout=30)["status"]
    assert status["reason"] == "NodeRestart"
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 137 and terminated["reason"] == "ContainerStatusUnknown"
