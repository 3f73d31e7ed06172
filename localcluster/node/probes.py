"""Container probes as kubelet reads and counts them (pure: no sockets, no threads).

`parse_probes` turns a container's `livenessProbe`/`readinessProbe`/`startupProbe` into
`Probe` values (defaults as the API defines them, named ports resolved, anything the node
cannot run refused with the field named); `ProbeTracker` applies success/failure
thresholds to raw results. Running the probes is `prober.py`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from .podspec import PodSpecError

KINDS = ("startup", "liveness", "readiness")
# API defaults (k8s.io/api core/v1 Probe) for fields the object may lack.
DEFAULT_PERIOD = 10
DEFAULT_TIMEOUT = 1
DEFAULT_FAILURE_THRESHOLD = 3
USER_AGENT = "kube-probe/1.31"


@dataclass(frozen=True)
class HttpGet:
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TcpSocket:
    port: int
    host: str | None = None


@dataclass(frozen=True)
class Exec:
    command: tuple[str, ...]


Action = Union[HttpGet, TcpSocket, Exec]


@dataclass(frozen=True)
class Probe:
    kind: str  # startup | liveness | readiness
    action: Action
    initial_delay: float = 0.0
    period: float = DEFAULT_PERIOD
    timeout: float = DEFAULT_TIMEOUT
    success_threshold: int = 1
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    termination_grace: int | None = None  # probe-level terminationGracePeriodSeconds

    @property
    def label(self) -> str:
        """How kubelet names it in events: `Liveness probe failed: ...`."""
        return self.kind.capitalize()


def resolve_port(container: Mapping[str, Any], port: Any, where: str) -> int:
    """A probe port is a number or the name of one of the container's `ports`."""
    if isinstance(port, bool) or port is None:
        raise PodSpecError(f"{where}: a port number or container port name is required")
    if isinstance(port, int):
        number = port
    else:
        named = [p for p in container.get("ports") or [] if p.get("name") == port]
        if named:
            number = int(named[0]["containerPort"])
        elif str(port).isdigit():
            number = int(port)
        else:
            known = sorted(p["name"] for p in container.get("ports") or [] if p.get("name"))
            raise PodSpecError(f"{where}: no container port named {port!r} (named ports: "
                               f"{known or 'none'}); use a number or add it to `ports`")
    if not 0 < number < 65536:
        raise PodSpecError(f"{where}: port {number} is out of range 1-65535")
    return number


def _action(container: Mapping[str, Any], spec: Mapping[str, Any], where: str) -> Action:
    given = [k for k in ("httpGet", "tcpSocket", "exec", "grpc") if spec.get(k) is not None]
    if len(given) != 1:
        raise PodSpecError(f"{where}: exactly one of httpGet, tcpSocket, exec is required, "
                           f"got {given or 'none'}")
    kind = given[0]
    body = spec[kind]
    if kind == "grpc":
        raise PodSpecError(f"{where}.grpc: gRPC probes are not supported by the process node; "
                           "use httpGet, tcpSocket or exec")
    if kind == "exec":
        command = body.get("command") or []
        if not command:
            raise PodSpecError(f"{where}.exec.command: a non-empty command is required")
        return Exec(tuple(str(c) for c in command))
    port = resolve_port(container, body.get("port"), f"{where}.{kind}.port")
    host = body.get("host") or None
    if kind == "tcpSocket":
        return TcpSocket(port=port, host=host)
    scheme = str(body.get("scheme") or "HTTP").upper()
    if scheme not in ("HTTP", "HTTPS"):
        raise PodSpecError(f"{where}.httpGet.scheme: {scheme!r} is not HTTP or HTTPS")
    path = body.get("path") or "/"
    if not path.startswith("/"):
        path = "/" + path
    headers = tuple((str(h["name"]), str(h.get("value", "")))
                    for h in body.get("httpHeaders") or [])
    return HttpGet(port=port, path=path, scheme=scheme, host=host, headers=headers)


def _number(spec: Mapping[str, Any], key: str, default: int, minimum: int, where: str) -> int:
    value = spec.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PodSpecError(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def parse_probe(container: Mapping[str, Any], kind: str, where: str) -> Probe | None:
    spec = container.get(f"{kind}Probe")
    if spec is None:
        return None
    where = f"{where}.{kind}Probe"
    success = _number(spec, "successThreshold", 1, 1, where)
    if kind != "readiness" and success != 1:
        raise PodSpecError(f"{where}.successThreshold: must be 1 for {kind} probes")
    return Probe(
        kind=kind,
        action=_action(container, spec, where),
        initial_delay=_number(spec, "initialDelaySeconds", 0, 0, where),
        period=_number(spec, "periodSeconds", DEFAULT_PERIOD, 1, where),
        timeout=_number(spec, "timeoutSeconds", DEFAULT_TIMEOUT, 1, where),
        success_threshold=success,
        failure_threshold=_number(spec, "failureThreshold", DEFAULT_FAILURE_THRESHOLD, 1, where),
        termination_grace=(None if spec.get("terminationGracePeriodSeconds") is None
                           else _number(spec, "terminationGracePeriodSeconds", 0, 0, where)),
    )


def parse_probes(pod: Mapping[str, Any], container_name: str) -> dict[str, Probe]:
    """The probes of one (regular) container, keyed by kind; PodSpecError names the field."""
    containers = pod.get("spec", {}).get("containers") or []
    for index, container in enumerate(containers):
        if container.get("name") == container_name:
            where = f"spec.containers[{index}]"
            probes = {kind: parse_probe(container, kind, where) for kind in KINDS}
            return {kind: p for kind, p in probes.items() if p is not None}
    return {}


@dataclass
class ProbeTracker:
    """Consecutive results against the thresholds: the result changes only after
    `success_threshold` successes or `failure_threshold` failures in a row."""

    probe: Probe
    result: bool | None  # None: not known yet (a startup probe before its first verdict)
    failures: int = 0
    successes: int = 0
    last_message: str = field(default="")

    def observe(self, ok: bool, message: str = "") -> bool:
        """Count one result; returns whether `result` changed."""
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.failures, self.successes = self.failures + 1, 0
            self.last_message = message
        if ok and self.successes >= self.probe.success_threshold and self.result is not True:
            self.result = True
            return True
        if not ok and self.failures >= self.probe.failure_threshold and self.result is not False:
            self.result = False
            return True
        return False


def initial_result(kind: str) -> bool | None:
    """Kubelet's starting point: readiness fails until proven, liveness passes until
    disproven, startup is unknown."""
    return {"readiness": False, "liveness": True, "startup": None}[kind]
