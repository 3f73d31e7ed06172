"""Kueue on the local cluster: its CRDs, webhooks and manager, installed from the Go module built by
``python -m localcluster build kueue``.

The manager runs as a host process with the admin kubeconfig, as the control plane does; its
webhooks are registered with ``clientConfig.url: https://127.0.0.1:<port>/...`` and the CA of a
serving certificate generated here, so Kueue's own certificate rotation (which expects a Service
and a Secret in its namespace) stays off. Everything Kueue ships — the CRDs and the list of webhook
paths — is read from the module it was built from, so the install always matches the binary.

Only the ``pod`` integration is enabled, and only in namespaces carrying ``MANAGED_LABEL``: the
webhook's namespaceSelector and Kueue's ``managedJobsNamespaceSelector`` both use it, so pods of
any other namespace never wait on Kueue.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from localcluster import certs, processes
from localcluster.build import build_kueue, go_module_dir
from localcluster.versions import KUEUE_VERSION

MODULE = "sigs.k8s.io/kueue"
# Namespaces with this label are managed by Kueue's pod integration (and only those).
MANAGED_LABEL = ("localcluster.kueue/managed", "true")
# Kueue's own namespace (its Configuration names one; nothing is deployed there).
KUEUE_NAMESPACE = "kueue-system"
# Webhook paths served with only the `pod` framework enabled: the pod webhooks and Kueue's own
# API types. Every other path in Kueue's manifest belongs to a framework that is off here, would
# answer 404, and with failurePolicy Fail would block that kind cluster-wide.
_SERVED_PATH_PARTS = ("-kueue-x-k8s-io-", "--v1-pod")
# Where the manager insists on reading a metrics serving certificate when its internal cert
# management is off; provided through an overlay in the manager's private mount namespace.
_METRICS_CERT_DIR = "kueue/metrics/certs"


class KueueError(RuntimeError):
    """Kueue could not be installed or did not come up; the message says why."""


def module_dir() -> Path:
    """Kueue's module in the Go module cache, at the version the tools module pins."""
    try:
        return go_module_dir("kueue", MODULE, KUEUE_VERSION, "config")
    except RuntimeError as exc:
        raise KueueError(str(exc)) from None


def crd_documents(module: Path) -> list[dict[str, Any]]:
    """Kueue's CRDs, the files its own kustomization lists (v1beta2 is the storage version; the
    conversion webhook patches are left out: only v1beta2 is ever written here)."""
    crd_dir = module / "config" / "components" / "crd"
    listed = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())["resources"]
    return [yaml.safe_load((crd_dir / name).read_text()) for name in listed]


def webhook_configurations(module: Path, port: int, ca_pem: bytes) -> list[dict[str, Any]]:
    """Kueue's Mutating/ValidatingWebhookConfigurations pointed at the host process."""
    manifest = module / "config" / "components" / "webhook" / "manifests.yaml"
    bundle = base64.b64encode(ca_pem).decode()
    result = []
    for document in yaml.safe_load_all(manifest.read_text()):
        webhooks = []
        for webhook in document["webhooks"]:
            path = webhook["clientConfig"]["service"]["path"]
            if not any(part in path for part in _SERVED_PATH_PARTS):
                continue
            webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
            if path.endswith("-v1-pod"):
                key, value = MANAGED_LABEL
                webhook["namespaceSelector"] = {"matchLabels": {key: value}}
            webhooks.append(webhook)
        result.append({
            "apiVersion": document["apiVersion"], "kind": document["kind"],
            "metadata": {"name": f"kueue-{document['metadata']['name']}"}, "webhooks": webhooks,
        })
    return result


def manager_configuration(webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    key, value = MANAGED_LABEL
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        # Metrics off: nothing scrapes them here and a fixed port would collide between sessions.
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "managedJobsNamespaceSelector": {"matchLabels": {key: value}},
        "integrations": {"frameworks": ["pod"]},
        # The on-demand visibility API server reads its certificate from the fixed path
        # /visibility and is an aggregated API nobody registers here: off.
        "featureGates": {"VisibilityOnDemand": False},
    }


def _serving_certificate(directory: Path) -> bytes:
    """A CA and a serving cert for 127.0.0.1 as tls.crt/tls.key (the names controller-runtime
    reads); returns the CA in PEM for the webhooks' caBundle."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = certs.KeyPair(directory / "ca.crt", directory / "ca.key")
    ca_key, ca_cert = certs._make_ca(ca, "localcluster-kueue-ca")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kueue-webhook")])
    certs._issue(certs.KeyPair(directory / "tls.crt", directory / "tls.key"), ca_key, ca_cert, subject,
                 server=True, dns_names=("localhost",), ips=("127.0.0.1",))
    return ca.cert.read_bytes()


def _overlay_argv(state: Path, argv: list[str]) -> list[str]:
    """argv run in a private mount namespace whose /etc carries the metrics certificate the
    manager reads from a fixed path: an overlay on /etc, so the host's /etc is never written."""
    upper, work = state / "etc-upper", state / "etc-work"
    target = upper / _METRICS_CERT_DIR
    target.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("tls.crt", "tls.key"):
        shutil.copy(state / "certs" / name, target / name)
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare.insert(1, "--map-root-user")
    script = (f'mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc '
              '&& exec "$@"')
    return [*unshare, "sh", "-c", script, "kueue", *argv]


def _wait(what: str, check: Callable[[], bool], record: processes.DaemonRecord, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not processes.is_running(record):
            raise KueueError(f"the Kueue manager exited while waiting for {what}:\n"
                             f"{processes.log_tail(record.log)}")
        if check():
            return
        time.sleep(0.3)
    raise KueueError(f"timed out after {timeout:.0f} s waiting for {what}:\n{processes.log_tail(record.log)}")


def _tls_accepts(port: int, ca_file: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return True
    except OSError:
        return False


@dataclass
class Kueue:
    """A running Kueue manager and what was registered for it."""

    record: processes.DaemonRecord
    state_dir: Path
    webhook_names: tuple[tuple[str, str], ...]   # (kind, name)

    @property
    def log(self) -> Path:
        return Path(self.record.log)


def install(kubectl: Callable[..., subprocess.CompletedProcess], kubeconfig: Path, state_dir: Path,
            log: Callable[[str], None] = print, timeout: float = 120.0) -> Kueue:
    """Build (cached) and start Kueue against the cluster `kubeconfig` points at.

    `kubectl(*args, input=..., check=True)` runs the cluster's kubectl. Returns once the manager
    is ready and its webhooks answer (a ClusterQueue can be created through them)."""
    binary = build_kueue(log).kueue
    module = module_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    ca_pem = _serving_certificate(state_dir / "certs")
    webhook_port, health_port = processes.free_loopback_ports(2)

    documents = crd_documents(module)
    kubectl("apply", "--server-side", "-f", "-", input=_yaml(documents), check=True)
    names = [d["metadata"]["name"] for d in documents]
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            *[f"crd/{name}" for name in names], check=True)
    kubectl("create", "namespace", KUEUE_NAMESPACE, check=False)

    config_path = state_dir / "config.yaml"
    config_path.write_text(json.dumps(
        manager_configuration(webhook_port, health_port, state_dir / "certs"), indent=1))
    argv = [str(binary), f"--config={config_path}", "--zap-log-level=2"]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    record = processes.start_daemon("kueue", _overlay_argv(state_dir, argv), state_dir / "kueue.log",
                                    state_dir / "pids", env=env)
    try:
        _wait("the manager's /readyz", lambda: processes.http_ok(f"http://127.0.0.1:{health_port}/readyz"),
              record, timeout)
        _wait("the webhook server", lambda: _tls_accepts(webhook_port, state_dir / "certs" / "ca.crt"),
              record, timeout)
        hooks = webhook_configurations(module, webhook_port, ca_pem)
        kubectl("apply", "-f", "-", input=_yaml(hooks), check=True)
    except BaseException:   # pytest.fail from the caller's kubectl is not an Exception
        processes.stop_daemon(record)
        raise
    return Kueue(record, state_dir, tuple((h["kind"], h["metadata"]["name"]) for h in hooks))


def uninstall(kueue: Kueue, kubectl: Callable[..., subprocess.CompletedProcess]) -> None:
    """Unregister the webhooks first (a webhook with no server behind it would refuse every pod
    of a managed namespace), then stop the manager."""
    for kind, name in kueue.webhook_names:
        kubectl("delete", kind.lower(), name, "--ignore-not-found", check=False)
    processes.stop_daemon(kueue.record)


def queue_objects(cluster_queue: str, local_queue: str, namespace: str, quota: dict[str, str],
                  flavor: str = "default-flavor", preemption: bool = True) -> list[dict[str, Any]]:
    """A ResourceFlavor, a ClusterQueue with `quota` (e.g. {"cpu": "1"}) and a LocalQueue in
    `namespace`. With `preemption`, a higher-priority workload evicts lower ones in the queue."""
    cq_spec: dict[str, Any] = {
        "namespaceSelector": {},
        "resourceGroups": [{
            "coveredResources": sorted(quota),
            "flavors": [{"name": flavor, "resources": [
                {"name": name, "nominalQuota": value} for name, value in sorted(quota.items())]}],
        }],
    }
    if preemption:
        cq_spec["preemption"] = {"withinClusterQueue": "LowerPriority"}
    return [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": flavor}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
         "spec": cq_spec},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
         "metadata": {"name": local_queue, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue}},
    ]


def _yaml(documents: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)
