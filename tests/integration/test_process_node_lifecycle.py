"""What a Deployment needs from the process node, against the real control plane: containers
restarted in place per restartPolicy with kubelet's crash-loop back-off, and liveness,
readiness and startup probes driving restarts and the Ready condition.

The session cluster's node runs with a 1 s / 4 s back-off (localcluster.pytest_plugin) so
crash loops take seconds; every assertion is what a user would read with kubectl.
"""

from __future__ import annotations

import datetime
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from localcluster.pytest_plugin import wait_for

pytestmark = pytest.mark.cluster


def pod(cluster: Any, ns: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json")
    return json.loads(result.stdout) if result.returncode == 0 else None


def container_status(obj: dict[str, Any] | None) -> dict[str, Any]:
    statuses = (obj or {}).get("status", {}).get("containerStatuses") or [{}]
    return statuses[0]


def conditions(obj: dict[str, Any] | None) -> dict[str, str]:
    return {c["type"]: c["status"] for c in (obj or {}).get("status", {}).get("conditions", [])}


def events(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    return cluster.get_json("events", "--field-selector", f"involvedObject.name={name}",
                            namespace=ns)["items"]


def python_pod(name: str, script: str, restart_policy: str, **container: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart_policy, "terminationGracePeriodSeconds": 10,
                     "containers": [{"name": "main", "image": "python:3.11",
                                     "command": ["python", "-u", "-c", textwrap.dedent(script)],
                                     **container}]}}


# A tiny web server on 8080: it listens once the file $LISTEN_WHEN exists (if set) and
# answers /healthz with 503 to the first $FAIL_FIRST requests, 200 afterwards.
WEB_SERVER = """
    import http.server, os, time
    gate = os.environ.get("LISTEN_WHEN")
    while gate and not os.path.exists(gate):
        time.sleep(0.1)
    failures = [int(os.environ.get("FAIL_FIRST", "0"))]
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            code = 404
            if self.path == "/healthz":
                code = 503 if failures[0] > 0 else 200
                failures[0] -= 1
            self.send_response(code)
            self.end_headers()
    print("listening", flush=True)
    http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def test_always_restarts_a_crashing_container_with_back_off_and_deletes_promptly(
        local_cluster: Any, new_namespace: str) -> None:
    ns = new_namespace
    local_cluster.apply(python_pod("crasher", "print('crashing'); raise SystemExit(1)", "Always"),
                        ns)
    seen_phases: set[str] = set()

    def in_back_off() -> dict[str, Any] | None:
        obj = pod(local_cluster, ns, "crasher")
        seen_phases.add((obj or {}).get("status", {}).get("phase", ""))
        cs = container_status(obj)
        waiting = cs.get("state", {}).get("waiting", {})
        return cs if cs.get("restartCount", 0) >= 1 and waiting.get("reason") == \
            "CrashLoopBackOff" else None

    backing_off = wait_for("CrashLoopBackOff after a restart", in_back_off, timeout=30, every=0.2)
    assert "back-off" in backing_off["state"]["waiting"]["message"]
    last = backing_off["lastState"]["terminated"]
    assert (last["exitCode"], last["reason"]) == (1, "Error")
    first_count = backing_off["restartCount"]
    assert backing_off["ready"] is False

    def restarted_again() -> dict[str, Any] | None:
        obj = pod(local_cluster, ns, "crasher")
        seen_phases.add((obj or {}).get("status", {}).get("phase", ""))
        cs = container_status(obj)
        return obj if cs.get("restartCount", 0) >= first_count + 1 else None

    wait_for("restartCount to grow", restarted_again, timeout=30, every=0.2)
    assert seen_phases <= {"Pending", "Running"}, "an Always pod never ends on its own"
    reasons = [e["reason"] for e in events(local_cluster, ns, "crasher")]
    assert reasons.count("Started") >= 2 and "BackOff" in reasons
    # Each instance has its own log: the latest one (empty if it only just started), and the
    # one before it, which has ended, with --previous.
    current = local_cluster.kubectl("logs", "crasher", "-n", ns, check=True).stdout
    assert current in ("", "crashing\n"), current
    previous = local_cluster.kubectl("logs", "crasher", "-n", ns, "--previous", check=True).stdout
    assert previous == "crashing\n", previous

    wait_for("the next back-off", in_back_off, timeout=30, every=0.2)
    started = time.monotonic()
    local_cluster.kubectl("delete", "pod", "crasher", "-n", ns, "--wait=false", check=True)
    wait_for("the pod to be deleted", lambda: pod(local_cluster, ns, "crasher") is None,
             timeout=30, every=0.2)
    # Nothing runs during a back-off: the pod goes at once, well before its 10 s grace period.
    assert time.monotonic() - started < 8, "deletion waited for a grace period"


def test_on_failure_restarts_until_exit_zero_then_succeeds(local_cluster: Any,
                                                          new_namespace: str) -> None:
    ns = new_namespace
    # The emptyDir outlives the container (not the pod): the second instance finds the mark.
    # The init container does the same (its own mark): a failed init container is retried.
    script = """
        import os, sys
        mark = '/lk-onfailure/attempted-' + sys.argv[1]
        if not os.path.exists(mark):
            open(mark, 'w').close()
            print('first attempt fails'); sys.exit(int(sys.argv[2]))
        print('second attempt succeeds')
    """
    mounts = [{"name": "work", "mountPath": "/lk-onfailure"}]
    manifest = python_pod("retry", script, "OnFailure", args=["main", "3"], volumeMounts=mounts)
    manifest["spec"]["initContainers"] = [{
        "name": "prepare", "image": "python:3.11", "volumeMounts": mounts,
        "command": ["python", "-c", textwrap.dedent(script), "prepare", "5"]}]
    manifest["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
    local_cluster.apply(manifest, ns)

    obj = wait_for("the pod to finish", lambda: (o := pod(local_cluster, ns, "retry")) and
                   o["status"].get("phase") in ("Succeeded", "Failed") and o, timeout=60)

    cs = container_status(obj)
    assert obj["status"]["phase"] == "Succeeded"
    assert cs["restartCount"] == 1
    assert cs["state"]["terminated"]["exitCode"] == 0
    assert cs["lastState"]["terminated"]["exitCode"] == 3
    init = obj["status"]["initContainerStatuses"][0]
    assert init["restartCount"] == 1 and init["state"]["terminated"]["exitCode"] == 0
    assert init["lastState"]["terminated"]["exitCode"] == 5
    time.sleep(2)  # longer than the back-off: a finished OnFailure container stays finished
    assert container_status(pod(local_cluster, ns, "retry"))["restartCount"] == 1


def test_startup_and_http_readiness_probes_hold_ready_until_the_server_answers(
        local_cluster: Any, new_namespace: str, tmp_path: Path) -> None:
    ns = new_namespace
    gate = tmp_path / "gate"
    gate.mkdir()
    manifest = python_pod(
        "web", WEB_SERVER, "Always",
        env=[{"name": "LISTEN_WHEN", "value": "/lk-gate/open"},
             {"name": "FAIL_FIRST", "value": "2"}],
        ports=[{"name": "http", "containerPort": 8080}],
        volumeMounts=[{"name": "gate", "mountPath": "/lk-gate"}],
        startupProbe={"tcpSocket": {"port": "http"}, "periodSeconds": 1, "failureThreshold": 60},
        readinessProbe={"httpGet": {"path": "/healthz", "port": "http",
                                    "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                        "periodSeconds": 1, "timeoutSeconds": 3})
    manifest["spec"]["volumes"] = [{"name": "gate", "hostPath": {"path": str(gate)}}]
    local_cluster.apply(manifest, ns)

    def running() -> dict[str, Any] | None:
        obj = pod(local_cluster, ns, "web")
        return obj if container_status(obj).get("state", {}).get("running") else None

    wait_for("the container to run", running, timeout=30, every=0.2)
    time.sleep(2)  # the startup probe fails meanwhile: nothing listens yet
    early = pod(local_cluster, ns, "web")
    early_status = container_status(early)
    assert early["status"]["phase"] == "Running"
    assert (early_status["started"], early_status["ready"]) == (False, False)
    assert conditions(early)["Ready"] == "False"

    (gate / "open").touch()
    ready = wait_for("the pod to become Ready",
                     lambda: (o := pod(local_cluster, ns, "web")) and
                     conditions(o).get("Ready") == "True" and o, timeout=30, every=0.2)

    assert "listening" in local_cluster.kubectl("logs", "web", "-n", ns, check=True).stdout
    cs = container_status(ready)
    assert cs["started"] is True and cs["ready"] is True and cs["restartCount"] == 0
    assert conditions(ready)["ContainersReady"] == "True"
    unhealthy = [e["message"] for e in events(local_cluster, ns, "web")
                 if e["reason"] == "Unhealthy"]
    assert any(m.startswith("Startup probe failed: dial tcp") for m in unhealthy), unhealthy
    # Ready only after the server's two 503s: readiness ran after startup and held it back.
    assert unhealthy.count("Readiness probe failed: HTTP probe failed with statuscode: 503") \
        == 2, unhealthy


def test_failing_exec_liveness_probe_restarts_the_container(local_cluster: Any,
                                                             new_namespace: str) -> None:
    ns = new_namespace
    # Healthy for 4 s, then the file the probe checks goes away. The file lives on a mount
    # only the pod's mount namespace has: a probe run elsewhere would fail from the start
    # and kill the first instance before it logs `removed`. SIGTERM is ignored, so only the
    # SIGKILL after the probe's own grace period (1 s, not the pod's 10 s) ends it.
    script = """
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open('/lk-liveness/healthy', 'w').close()
        print('healthy', flush=True)
        time.sleep(4)
        os.remove('/lk-liveness/healthy')
        print('removed', flush=True)
        while True: time.sleep(1)
    """
    manifest = python_pod(
        "sick", script, "Always",
        volumeMounts=[{"name": "state", "mountPath": "/lk-liveness"}],
        # timeoutSeconds: each probe starts the launcher (a Python process); give it room.
        livenessProbe={"exec": {"command": ["cat", "/lk-liveness/healthy"]},
                       "periodSeconds": 1, "failureThreshold": 2, "timeoutSeconds": 3,
                       "terminationGracePeriodSeconds": 1})
    manifest["spec"]["volumes"] = [{"name": "state", "emptyDir": {}}]
    local_cluster.apply(manifest, ns)

    obj = wait_for("a restart after the liveness probe failed",
                   lambda: (o := pod(local_cluster, ns, "sick")) and
                   container_status(o).get("restartCount", 0) >= 1 and o, timeout=45, every=0.3)

    first = local_cluster.kubectl("logs", "sick", "-n", ns, "--previous", check=True).stdout
    assert first.split() == ["healthy", "removed"], first
    last = container_status(obj)["lastState"]["terminated"]
    assert last["exitCode"] == 137  # SIGKILL: SIGTERM was ignored
    assert obj["status"]["phase"] == "Running"
    found = events(local_cluster, ns, "sick")
    killing = [e for e in found if e["reason"] == "Killing"]
    assert [e["message"] for e in killing] == \
        ["Container main failed liveness probe, will be restarted"]
    assert any(e["reason"] == "Unhealthy" and
               e["message"].startswith("Liveness probe failed: cat:") for e in found), found
    killed_after = _seconds(last["finishedAt"]) - _seconds(killing[0]["firstTimestamp"])
    # The pod's grace (10 s) would make it at least 10 (the timestamps have whole seconds).
    assert killed_after <= 6, f"SIGKILL came {killed_after}s after Killing (probe grace 1 s)"


def _seconds(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_probe_the_node_cannot_run_is_reported_naming_the_field(local_cluster: Any,
                                                                  new_namespace: str) -> None:
    ns = new_namespace
    bad = {"readinessProbe": {"httpGet": {"port": "metrics"}}}
    local_cluster.apply([python_pod("bad-never", "import time; time.sleep(60)", "Never", **bad),
                         python_pod("bad-always", "import time; time.sleep(60)", "Always", **bad)],
                        ns)
    field = "spec.containers[0].readinessProbe.httpGet.port: no container port named 'metrics'"

    failed = wait_for("the Never pod to fail",
                      lambda: (o := pod(local_cluster, ns, "bad-never")) and
                      o["status"].get("phase") == "Failed" and o, timeout=30)
    assert field in failed["status"]["message"]

    # A restarting pod is left Pending and waiting, as kubelet leaves it: failing it would
    # make its ReplicaSet replace it with the same broken pod in a loop.
    waiting = wait_for("the Always pod to report the error",
                       lambda: container_status(pod(local_cluster, ns, "bad-always"))
                       .get("state", {}).get("waiting", {}).get("reason") ==
                       "CreateContainerConfigError" and pod(local_cluster, ns, "bad-always"),
                       timeout=30)
    assert waiting["status"]["phase"] == "Pending"
    assert field in container_status(waiting)["state"]["waiting"]["message"]


def test_deployment_with_readiness_probe_becomes_available(local_cluster: Any,
                                                           new_namespace: str) -> None:
    ns = new_namespace
    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {
            "replicas": 2, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "terminationGracePeriodSeconds": 5,
                "containers": [{
                    "name": "web", "image": "python:3.11",
                    "command": ["python", "-u", "-c", textwrap.dedent(WEB_SERVER)],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                                       "periodSeconds": 1},
                    # Generous: on a loaded machine a slow start must not look like death.
                    "livenessProbe": {"tcpSocket": {"port": 8080}, "initialDelaySeconds": 15,
                                      "periodSeconds": 1, "failureThreshold": 10,
                                      "timeoutSeconds": 3},
                }]}},
        },
    }
    local_cluster.apply(deployment, ns)

    def available() -> dict[str, Any] | None:
        status = local_cluster.get_json("deployment", "web", namespace=ns).get("status", {})
        return status if status.get("availableReplicas") == 2 else None

    def story() -> str:
        pods = local_cluster.get_json("pods", "-l", "app=web", namespace=ns)["items"]
        seen = [e["reason"] + ": " + e["message"] for e in
                local_cluster.get_json("events", namespace=ns)["items"]]
        return json.dumps({"pods": [p["status"] for p in pods], "events": seen}, indent=1)

    status = wait_for("2 available replicas", available, timeout=60)
    pods = local_cluster.get_json("pods", "-l", "app=web", namespace=ns)["items"]
    assert status["readyReplicas"] == 2 and len(pods) == 2, story()
    assert len({p["status"]["podIP"] for p in pods}) == 2  # two pods, one port each
    assert all(container_status(p)["restartCount"] == 0 for p in pods), story()
    assert all(conditions(p)["Ready"] == "True" for p in pods)
    # Ready after a NotReady spell: the old reason/message must be gone, not merged into it.
    for pod in pods:
        for cond in pod["status"]["conditions"]:
            if cond["type"] in ("Ready", "ContainersReady"):
                assert "reason" not in cond and "message" not in cond, story()
    never_restarted = local_cluster.kubectl("logs", pods[0]["metadata"]["name"], "-n", ns,
                                            "--previous")
    assert never_restarted.returncode != 0
    assert 'previous terminated container "web"' in never_restarted.stderr
