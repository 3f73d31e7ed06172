"""Probe workers: one thread per probe of a running container, reporting raw results.

A worker only runs its probe on schedule and hands `(ok, message)` to a callback (the
daemon puts it on its event queue); thresholds, readiness and restarts are decided on the
daemon's loop. HTTP and TCP probes connect from the host to the pod's IP over the bridge,
which is where kubelet probes from too (so a server bound to the pod's loopback only is
not reachable, as on a real node); exec probes run through the container launcher, inside
the pod's network namespace with the container's mounts and environment.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

from .probes import USER_AGENT, Exec, HttpGet, Probe, TcpSocket
from .runtime import LaunchSpec, run_in_pod

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1024  # bytes of an exec probe's output kept in the event message


def http_probe(action: HttpGet, pod_ip: str, timeout: float) -> tuple[bool, str]:
    host = action.host or pod_ip
    url = f"{action.scheme.lower()}://{host}:{action.port}{action.path}"
    if action.scheme == "HTTPS":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # as kubelet does
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, action.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, action.port, timeout=timeout)
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    for name, value in action.headers:
        headers[name] = value  # the pod's headers win, Host included
    try:
        conn.request("GET", action.path, headers=headers)
        response = conn.getresponse()
        response.read(OUTPUT_LIMIT)
    except (OSError, http.client.HTTPException) as exc:
        return False, f'Get "{url}": {_describe(exc)}'
    finally:
        conn.close()
    # Kubelet counts 2xx and 3xx as success (it does not need to follow the redirect).
    if 200 <= response.status < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {response.status}"


def tcp_probe(action: TcpSocket, pod_ip: str, timeout: float) -> tuple[bool, str]:
    host = action.host or pod_ip
    try:
        socket.create_connection((host, action.port), timeout=timeout).close()
    except OSError as exc:
        return False, f"dial tcp {host}:{action.port}: {_describe(exc)}"
    return True, ""


def exec_probe(action: Exec, spec: LaunchSpec, timeout: float) -> tuple[bool, str]:
    code, output = run_in_pod(spec, list(action.command), timeout)
    text = output[-OUTPUT_LIMIT:].decode(errors="replace").strip()
    if code is None:
        return False, f"command {list(action.command)} timed out after {timeout:g}s"
    if code != 0:
        return False, text or f"command {list(action.command)} exited with code {code}"
    return True, ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "i/o timeout (Client.Timeout exceeded while awaiting headers)"
    if isinstance(exc, ConnectionRefusedError):
        return "connect: connection refused"
    return str(exc) or type(exc).__name__


class ProbeWorker:
    """Runs `probe` every `period` seconds from `started + initial_delay` until stopped."""

    def __init__(self, probe: Probe, pod_ip: str, launch: LaunchSpec | None, started: float,
                 report: Callable[[bool, str], None], name: str) -> None:
        self.probe = probe
        self._pod_ip = pod_ip
        self._launch = launch
        self._started = started
        self._report = report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _probe_once(self) -> tuple[bool, str]:
        action, timeout = self.probe.action, self.probe.timeout
        if isinstance(action, HttpGet):
            return http_probe(action, self._pod_ip, timeout)
        if isinstance(action, TcpSocket):
            return tcp_probe(action, self._pod_ip, timeout)
        assert self._launch is not None, "exec probes need the container's launch spec"
        return exec_probe(action, self._launch, timeout)

    def _run(self) -> None:
        first = self._started + self.probe.initial_delay
        if self._stop.wait(max(0.0, first - time.monotonic())):
            return
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                ok, message = self._probe_once()
            except Exception as exc:  # a probe that cannot run is a failed probe
                log.exception("%s probe could not run", self.probe.kind)
                ok, message = False, f"probe error: {exc}"
            if self._stop.is_set():
                return  # the container ended meanwhile: the result is stale
            self._report(ok, message)
            self._stop.wait(max(0.0, self.probe.period - (time.monotonic() - began)))
