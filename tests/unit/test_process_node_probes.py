"""Restart policy, crash-loop back-off and probes of the process node, without a cluster:
the pure decisions (status.py, restarts.py, probes.py) and the HTTP/TCP probe clients
against real sockets on loopback."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster.node.kubelet_server import ensure_serving_cert
from localcluster.node.podspec import PodSpecError
from localcluster.node.prober import http_probe, tcp_probe
from localcluster.node.probes import (
    Exec, HttpGet, Probe, ProbeTracker, TcpSocket, initial_result, parse_probes,
)
from localcluster.node.restarts import BackOff, backoff_message, should_restart
from localcluster.node.status import ContainerRun, PodRun, status_patch


# -- restart policy and back-off ---------------------------------------------------------------

@pytest.mark.parametrize(("policy", "code", "init", "expected"), [
    ("Never", 1, False, False), ("Never", 0, False, False),
    ("OnFailure", 1, False, True), ("OnFailure", 0, False, False),
    ("Always", 0, False, True), ("Always", 137, False, True),
    ("Always", 0, True, False), ("Always", 2, True, True),  # init containers: failures only
])
def test_should_restart_follows_the_policy(policy: str, code: int, init: bool,
                                           expected: bool) -> None:
    assert should_restart(policy, code, init) is expected


def test_backoff_restarts_at_once_then_doubles_to_the_cap() -> None:
    backoff = BackOff(base=10, cap=300)
    entry, delays, now = None, [], 0.0
    for _ in range(8):
        now += 1.0  # the container crashes one second after each start
        delay, entry = backoff.plan(entry, now)
        delays.append(delay)
        now += delay
    assert delays == [0, 10, 20, 40, 80, 160, 300, 300]


def test_backoff_starts_over_after_the_container_ran_long_enough() -> None:
    backoff = BackOff(base=10, cap=300)
    delay, entry = backoff.plan(None, 0.0)
    delay, entry = backoff.plan(entry, 5.0)
    assert delay == 10
    delay, entry = backoff.plan(entry, 5.0 + 599)  # exits under 10 min apart: doubling
    assert delay == 20
    delay, entry = backoff.plan(entry, entry.last_exit + 601)  # ran over 10 min: reset
    assert delay == 0 and entry.backoff == 10


def test_backoff_refuses_a_cap_below_the_base() -> None:
    with pytest.raises(ValueError, match="base <= cap"):
        BackOff(base=5, cap=1)


def test_backoff_message_is_worded_like_kubelet() -> None:
    assert backoff_message(20, "main", "web-1", "ml", "u1") == \
        "back-off 20s restarting failed container=main pod=web-1_ml(u1)"


def _running_pod(*names: str) -> tuple[PodRun, list[ContainerRun]]:
    run = PodRun(uid="u", namespace="ml", name="p", pod_ip="10.250.0.2", sandbox_ready=True)
    containers = [ContainerRun(n, "img", init=False) for n in names]
    run.containers = containers
    for i, c in enumerate(containers):
        c.begin_instance(100 + i)
        c.state, c.started_at = "running", "2026-01-01T00:00:00Z"
    return run, containers


def _conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_a_crashed_container_waiting_for_restart_keeps_the_pod_running() -> None:
    run, (main,) = _running_pod("main")
    main.terminate(1, "Error")
    main.await_restart("CrashLoopBackOff", "back-off 10s restarting failed container=main")

    status = run.to_status()
    assert status["phase"] == "Running"
    cs = status["containerStatuses"][0]
    assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    assert cs["lastState"]["terminated"]["containerID"] == "process://100"
    assert cs["restartCount"] == 0 and cs["ready"] is False
    assert _conditions(status)["Ready"] == "False"
    assert "message" not in status  # a restarting pod has not failed

    main.begin_instance(200)
    main.state, main.started_at = "running", "2026-01-01T00:00:05Z"
    cs = run.to_status()["containerStatuses"][0]
    assert cs["restartCount"] == 1 and cs["containerID"] == "process://200"
    assert cs["state"]["running"] and cs["lastState"]["terminated"]["exitCode"] == 1


def test_on_failure_pod_succeeds_once_the_restarted_container_exits_zero() -> None:
    run, (main,) = _running_pod("main")
    main.terminate(1, "Error")
    main.await_restart("CrashLoopBackOff")
    main.begin_instance(300)
    main.state = "running"
    main.terminate(0, "Completed")

    status = run.to_status()
    assert status["phase"] == "Succeeded"
    cs = status["containerStatuses"][0]
    assert cs["restartCount"] == 1 and cs["state"]["terminated"]["exitCode"] == 0
    assert cs["lastState"]["terminated"]["exitCode"] == 1


def test_readiness_and_startup_verdicts_drive_ready_and_started() -> None:
    run, (web, sidecar) = _running_pod("web", "sidecar")
    web.readiness, web.startup = False, False
    status = run.to_status()
    web_status = status["containerStatuses"][0]
    assert (web_status["started"], web_status["ready"]) == (False, False)
    assert status["containerStatuses"][1]["ready"] is True  # no probe: running is ready
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ContainersNotReady"
    assert ready["message"] == "containers with unready status: [web]"

    web.startup = True
    assert run.to_status()["containerStatuses"][0]["started"] is True
    assert _conditions(run.to_status())["ContainersReady"] == "False"
    web.readiness = True
    assert _conditions(run.to_status()).items() >= {"Ready": "True", "ContainersReady": "True"}.items()


def test_the_status_patch_clears_what_a_restart_and_readiness_left_behind() -> None:
    """The node reports with a strategic merge patch, which keeps any key the patch leaves out:
    once a restarted container turns ready, the patch must remove the old ContainersNotReady
    reason/message and the `waiting` state, or the pod reads Ready True 'with unready status'."""
    run, (web,) = _running_pod("web")
    web.readiness = False
    web.terminate(143, "Error")
    web.await_restart("CrashLoopBackOff", "back-off 10s restarting failed container=web")
    before = status_patch(run.to_status())
    ready = next(c for c in before["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ContainersNotReady" and ready["status"] == "False"

    web.begin_instance(200)
    web.state, web.started_at = "running", "2026-01-01T00:00:05Z"
    web.readiness = True
    patch = status_patch(run.to_status())
    for kind in ("Ready", "ContainersReady"):
        cond = next(c for c in patch["conditions"] if c["type"] == kind)
        assert cond["status"] == "True"
        assert cond["reason"] is None and cond["message"] is None  # null: delete on merge
    (cs,) = patch["containerStatuses"]
    assert cs["restartCount"] == 1 and cs["ready"] is True
    assert cs["state"]["waiting"] is None and cs["state"]["terminated"] is None
    assert cs["state"]["running"]["startedAt"] == "2026-01-01T00:00:05Z"
    assert cs["lastState"]["terminated"]["exitCode"] == 143


# -- probe parsing -----------------------------------------------------------------------------

def _pod(**container: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "main", "command": ["x"], **container}]}}


def test_probes_parse_with_api_defaults_and_named_ports() -> None:
    pod = _pod(ports=[{"name": "http", "containerPort": 8080}],
               readinessProbe={"httpGet": {"port": "http", "path": "healthz", "scheme": "https",
                                           "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                               "periodSeconds": 2, "successThreshold": 2},
               livenessProbe={"exec": {"command": ["cat", "/tmp/ok"]},
                              "terminationGracePeriodSeconds": 3},
               startupProbe={"tcpSocket": {"port": 9000}, "failureThreshold": 30})

    probes = parse_probes(pod, "main")

    assert probes["readiness"] == Probe(
        kind="readiness", action=HttpGet(port=8080, path="/healthz", scheme="HTTPS",
                                         headers=(("X-Probe", "1"),)),
        period=2, success_threshold=2)
    assert probes["liveness"].action == Exec(("cat", "/tmp/ok"))
    assert (probes["liveness"].period, probes["liveness"].timeout,
            probes["liveness"].failure_threshold, probes["liveness"].termination_grace) \
        == (10, 1, 3, 3)
    assert probes["startup"].action == TcpSocket(port=9000)
    assert probes["startup"].failure_threshold == 30
    assert parse_probes(_pod(), "main") == {}


@pytest.mark.parametrize(("container", "message"), [
    ({"livenessProbe": {"httpGet": {"port": "web"}}},
     r"spec.containers\[0\].livenessProbe.httpGet.port: no container port named 'web'"),
    ({"readinessProbe": {"grpc": {"port": 9000}}},
     r"readinessProbe.grpc: gRPC probes are not supported"),
    ({"readinessProbe": {"periodSeconds": 1}},
     r"readinessProbe: exactly one of httpGet, tcpSocket, exec is required"),
    ({"livenessProbe": {"exec": {"command": ["true"]}, "successThreshold": 2}},
     r"livenessProbe.successThreshold: must be 1"),
    ({"startupProbe": {"tcpSocket": {"port": 70000}}}, r"port 70000 is out of range"),
    ({"readinessProbe": {"exec": {"command": []}}}, r"readinessProbe.exec.command"),
])
def test_bad_probes_are_refused_naming_the_field(container: dict[str, Any], message: str) -> None:
    with pytest.raises(PodSpecError, match=message):
        parse_probes(_pod(**container), "main")


# -- thresholds --------------------------------------------------------------------------------

def test_tracker_changes_only_after_threshold_results_in_a_row() -> None:
    probe = Probe("readiness", TcpSocket(80), success_threshold=2, failure_threshold=3)
    tracker = ProbeTracker(probe, initial_result("readiness"))
    assert tracker.result is False
    assert tracker.observe(True) is False  # one success of two
    assert tracker.observe(True) is True and tracker.result is True
    assert [tracker.observe(False, "down") for _ in range(2)] == [False, False]
    assert tracker.observe(True) is False  # the run of failures is broken
    assert [tracker.observe(False, "down") for _ in range(3)] == [False, False, True]
    assert tracker.result is False and tracker.last_message == "down"


def test_liveness_starts_healthy_and_startup_unknown() -> None:
    liveness = ProbeTracker(Probe("liveness", Exec(("true",)), failure_threshold=1),
                            initial_result("liveness"))
    assert liveness.result is True
    assert liveness.observe(False, "no") is True and liveness.result is False
    startup = ProbeTracker(Probe("startup", Exec(("true",))), initial_result("startup"))
    assert startup.result is None and startup.observe(True) is True


# -- the HTTP and TCP probe clients against real sockets ----------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def log_message(self, *args: Any) -> None:
        """Keep the test output quiet: the requests are recorded in `seen`, not logged."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        _Handler.seen.append(dict(self.headers))
        codes = {"/ok": 200, "/moved": 302, "/broken": 503}
        self.send_response(codes.get(self.path, 404))
        self.end_headers()


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_http_probe_counts_2xx_and_3xx_as_success(http_port: int) -> None:
    def probe(path: str) -> tuple[bool, str]:
        return http_probe(HttpGet(port=http_port, path=path, headers=(("X-Probe", "yes"),)),
                          "127.0.0.1", timeout=2)

    assert probe("/ok") == (True, "")
    assert probe("/moved") == (True, "")
    assert probe("/broken") == (False, "HTTP probe failed with statuscode: 503")
    assert _Handler.seen[-1]["X-Probe"] == "yes"
    assert _Handler.seen[-1]["User-Agent"].startswith("kube-probe/")


def test_http_and_tcp_probes_report_a_refused_connection() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ok, message = http_probe(HttpGet(port=port, path="/healthz"), "127.0.0.1", timeout=1)
    assert not ok and message == \
        f'Get "http://127.0.0.1:{port}/healthz": connect: connection refused'
    ok, message = tcp_probe(TcpSocket(port=port), "127.0.0.1", timeout=1)
    assert not ok and "connection refused" in message


def test_tcp_probe_succeeds_against_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert tcp_probe(TcpSocket(port=s.getsockname()[1]), "127.0.0.1", timeout=1) == (True, "")


def test_https_probe_does_not_verify_the_certificate(tmp_path: Path) -> None:
    cert, key = ensure_serving_cert(tmp_path, "127.0.0.1")  # self-signed, like most pods'
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert http_probe(HttpGet(port=port, path="/ok", scheme="HTTPS"), "127.0.0.1",
                          timeout=2) == (True, "")
        ok, message = http_probe(HttpGet(port=port, path="/broken", scheme="HTTPS"),
                                 "127.0.0.1", timeout=2)
        assert (ok, message) == (False, "HTTP probe failed with statuscode: 503")
    finally:
        server.shutdown()
