"""Start and stop etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback.

The argument builders are pure functions of the layout, the ports and the binaries, so what each
component runs with can be read (and tested) without starting anything.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from localcluster import kubeconfig
from localcluster.build import Binaries
from localcluster.certs import (
    FRONT_PROXY_CLIENT, POD_NETWORK_GATEWAY, ClusterPKI, generate_pki, pki_paths,
)
from localcluster.processes import (
    DaemonRecord, free_loopback_ports, is_running, log_tail, start_daemon, stop_daemons,
)

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_NAME = "lorakube-local"

# Controllers that do their job without a real kubelet or cloud. Left out on purpose:
# node-lifecycle / taint-eviction (they would evict pods whenever a process node pauses its
# heartbeat), node-ipam and routes (no pod CIDRs), volume controllers (no storage), CSR signing.
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "clusterrole-aggregation-controller",
    "root-ca-certificate-publisher-controller",
    "service-cidr-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "replicaset-controller",
    "deployment-controller",
    "statefulset-controller",
    "job-controller",
    "cronjob-controller",
    "ttl-after-finished-controller",
    "disruption-controller",
    "resourcequota-controller",
    "pod-garbage-collector-controller",
)

# Start order (each waits for the one before to be healthy).
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# Components that authenticate callers through the apiserver and serve with a generated cert.
DELEGATING_COMPONENTS = ("kube-controller-manager", "kube-scheduler")


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*free_loopback_ports(5))

    def all(self) -> list[int]:
        return list(asdict(self).values())


@dataclass(frozen=True)
class Layout:
    """Where everything of one cluster lives inside its state directory."""

    state_dir: Path

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def etcd_data(self) -> Path:
        return self.state_dir / "etcd-data"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state_dir / "admin.kubeconfig"

    def component_kubeconfig(self, component: str) -> Path:
        return self.state_dir / "kubeconfigs" / f"{component}.kubeconfig"

    def component_cert_dir(self, component: str) -> Path:
        return self.state_dir / "serving" / component

    @property
    def audit_log(self) -> Path:
        return self.log_dir / "audit.log"

    def log(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"


def server_url(ports: Ports) -> str:
    return f"https://127.0.0.1:{ports.apiserver}"


def etcd_args(etcd: Path, layout: Layout, ports: Ports) -> list[str]:
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(etcd),
        "--name=lorakube",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=lorakube={peer}",
        # A throw-away store: skipping fsync is what keeps it fast on a shared disk.
        "--unsafe-no-fsync=true",
        "--log-level=warn",
    ]


def apiserver_args(apiserver: Path, layout: Layout, ports: Ports, pki: ClusterPKI,
                   audit_policy: Path | None = None) -> list[str]:
    # An audit log only when asked (bench/operator_scale.py counts each controller's requests
    # with it); the policy decides whose requests are written, so the default costs nothing.
    audit = [f"--audit-policy-file={audit_policy}", f"--audit-log-path={layout.audit_log}",
             "--audit-log-format=json"] if audit_policy is not None else []
    return [
        str(apiserver), *audit,
        f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.apiserver}",
        # The address written into the `kubernetes` Service's endpoints: the pod network's gateway,
        # where the process node forwards in-cluster API traffic (loopback is not valid there).
        f"--advertise-address={POD_NETWORK_GATEWAY}",
        f"--cert-dir={layout.pki_dir}",
        f"--tls-cert-file={pki.apiserver.cert}",
        f"--tls-private-key-file={pki.apiserver.key}",
        f"--client-ca-file={pki.ca.cert}",
        "--authorization-mode=Node,RBAC",
        # Cluster-wide privileged pods stay possible so that Pod Security labels, not this flag,
        # decide per namespace (as on a production cluster).
        "--allow-privileged=true",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        f"--kubelet-client-certificate={pki.apiserver_kubelet_client.cert}",
        f"--kubelet-client-key={pki.apiserver_kubelet_client.key}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        # The aggregation layer's identity headers; without them every delegating component
        # (controller manager, scheduler, aggregated APIs) logs a missing request-header CA.
        f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
        f"--proxy-client-key-file={pki.front_proxy_client.key}",
        "--profiling=false",
    ]


def _delegating_component_args(component: str, layout: Layout, port: int) -> list[str]:
    kubeconfig_path = layout.component_kubeconfig(component)
    return [
        f"--kubeconfig={kubeconfig_path}",
        f"--authentication-kubeconfig={kubeconfig_path}",
        f"--authorization-kubeconfig={kubeconfig_path}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={layout.component_cert_dir(component)}",
        "--leader-elect=false",
        "--profiling=false",
    ]


def controller_manager_args(binary: Path, layout: Layout, ports: Ports, pki: ClusterPKI) -> list[str]:
    return [
        str(binary),
        *_delegating_component_args("kube-controller-manager", layout, ports.controller_manager),
        f"--controllers={','.join(CONTROLLERS)}",
        # Each controller acts under its own ServiceAccount and bootstrap ClusterRole, as in kubeadm.
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.service_account_key}",
        f"--root-ca-file={pki.ca.cert}",
        f"--cluster-name={CLUSTER_NAME}",
    ]


def scheduler_args(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    return [str(binary), *_delegating_component_args("kube-scheduler", layout, ports.scheduler)]


class StartupError(RuntimeError):
    """A component did not become healthy; the message carries its log tail."""


def _https_get(url: str, context: ssl.SSLContext, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def admin_ssl_context(pki: ClusterPKI) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
    return context


def _self_signed_context() -> ssl.SSLContext:
    # KCM and the scheduler serve /healthz with a self-signed cert generated at start.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def wait_healthy(record: DaemonRecord, check: Callable[[], bool], timeout: float) -> float:
    """Poll check() until it passes; fail at once if the process dies. Returns seconds waited."""
    started = time.monotonic()
    while True:
        if not is_running(record):
            raise StartupError(
                f"{record.name} exited during startup; last log lines ({record.log}):\n"
                f"{log_tail(record.log)}"
            )
        try:
            if check():
                return time.monotonic() - started
        except (OSError, ssl.SSLError):
            pass  # not listening yet
        if time.monotonic() - started > timeout:
            raise StartupError(
                f"{record.name} not healthy after {timeout:.0f} s; last log lines ({record.log}):\n"
                f"{log_tail(record.log)}"
            )
        time.sleep(0.5)


@dataclass
class ControlPlane:
    """One control plane in one state directory."""

    layout: Layout
    ports: Ports
    pki: ClusterPKI
    audit_policy: Path | None = None

    @property
    def server(self) -> str:
        return server_url(self.ports)

    @classmethod
    def prepare(cls, state_dir: Path, audit_policy: Path | None = None) -> ControlPlane:
        """Fresh ports, certificates and kubeconfigs; nothing is started yet."""
        layout = Layout(state_dir)
        ports = Ports.pick()
        pki = generate_pki(layout.pki_dir)
        plane = cls(layout, ports, pki, audit_policy)
        plane._write_kubeconfigs()
        return plane

    @classmethod
    def load(cls, state_dir: Path, ports: Ports) -> ControlPlane:
        """The control plane a previous `prepare` set up in state_dir (for status and down)."""
        layout = Layout(state_dir)
        return cls(layout, ports, pki_paths(layout.pki_dir))

    def _write_kubeconfigs(self) -> None:
        kubeconfig.write_for_cert(
            self.layout.admin_kubeconfig, self.server, self.pki.ca.cert, "lorakube-admin",
            self.pki.admin.cert, self.pki.admin.key,
        )
        for component, pair in (
            ("kube-controller-manager", self.pki.controller_manager),
            ("kube-scheduler", self.pki.scheduler),
        ):
            kubeconfig.write_for_cert(
                self.layout.component_kubeconfig(component), self.server, self.pki.ca.cert,
                component, pair.cert, pair.key,
            )

    def _argv(self, component: str, binaries: Binaries) -> list[str]:
        if component == "etcd":
            return etcd_args(binaries.etcd, self.layout, self.ports)
        if component == "kube-apiserver":
            return apiserver_args(binaries.kube_apiserver, self.layout, self.ports, self.pki, self.audit_policy)
        if component == "kube-controller-manager":
            return controller_manager_args(
                binaries.kube_controller_manager, self.layout, self.ports, self.pki
            )
        return scheduler_args(binaries.kube_scheduler, self.layout, self.ports)

    def _health_check(self, component: str) -> Callable[[], bool]:
        if component == "etcd":
            url = f"http://127.0.0.1:{self.ports.etcd_client}/health"

            def etcd_ok() -> bool:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return json.loads(response.read()).get("health") == "true"

            return etcd_ok
        if component == "kube-apiserver":
            context = admin_ssl_context(self.pki)
            return lambda: _https_get(f"{self.server}/readyz", context)[0] == 200
        port = (
            self.ports.controller_manager
            if component == "kube-controller-manager"
            else self.ports.scheduler
        )
        context = _self_signed_context()
        return lambda: _https_get(f"https://127.0.0.1:{port}/healthz", context)[0] == 200

    def start(self, binaries: Binaries, log: Callable[[str], None] = print,
              timeout: float = 180.0) -> list[DaemonRecord]:
        """Start every component in order, each only after the one before it is healthy."""
        self.layout.etcd_data.mkdir(parents=True, exist_ok=True)
        self.layout.etcd_data.chmod(0o700)  # etcd refuses a group/world-readable data dir
        records = []
        for component in COMPONENTS:
            if component in DELEGATING_COMPONENTS:
                self.layout.component_cert_dir(component).mkdir(parents=True, exist_ok=True)
            record = start_daemon(
                component, self._argv(component, binaries), self.layout.log(component),
                self.layout.pid_dir,
            )
            records.append(record)
            seconds = wait_healthy(record, self._health_check(component), timeout)
            log(f"  {component} healthy after {seconds:.1f} s (pid {record.pid})")
        return records

    def records(self) -> list[DaemonRecord]:
        return [
            DaemonRecord.load(self.layout.pid_dir / f"{name}.json")
            for name in COMPONENTS
            if (self.layout.pid_dir / f"{name}.json").is_file()
        ]

    def stop(self) -> None:
        """Clients first (together), then the apiserver, then etcd: an apiserver whose etcd
        vanished hangs in shutdown until it is killed."""
        records = {record.name: record for record in self.records()}
        for wave in (DELEGATING_COMPONENTS, ("kube-apiserver",), ("etcd",)):
            stop_daemons([records[name] for name in wave if name in records])
        for name in records:
            (self.layout.pid_dir / f"{name}.json").unlink(missing_ok=True)
