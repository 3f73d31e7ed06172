"""Kubeflow's training-operator on the local cluster, as the peer of the operator benchmark:
its PyTorchJob CRD and its controller, built from the Go module by
``python -m localcluster build training-operator``.

The controller runs as a host process with the admin kubeconfig, as the control plane does, with
only the PyTorchJob scheme enabled. Its webhooks are never registered (nothing here needs their
validation or defaulting, and the benchmark measures the controller), but v1.8.1 starts its webhook
server and certificate rotator regardless and waits for them before it starts any controller:

* the rotator reads and updates the Secret ``training-operator-webhook-cert`` in the namespace named
  by ``MY_POD_NAMESPACE``; it is created empty here, in a namespace of our own;
* it waits until ``/tmp/k8s-webhook-server/serving-certs/tls.crt`` exists (in a pod, the Secret
  mounted there), and the webhook server serves the pair found there. A fixed host path: the
  controller runs in a private mount namespace whose ``/tmp`` is an overlay (on a tmpfs) carrying
  a certificate generated here, so the host's ``/tmp`` is never written and two clusters never share it;
* once that is done it looks for its ValidatingWebhookConfiguration to inject the CA into; that
  one is missing (logged) and the controllers start anyway.

Everything the controller's CRD is read from the module it was built from, so the install always
matches the binary.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from localcluster import certs, processes
from localcluster.build import build_training_operator, go_module_dir
from localcluster.versions import TRAINING_OPERATOR_VERSION

MODULE = "github.com/kubeflow/training-operator"
# Where the controller's rotator keeps its Secret (MY_POD_NAMESPACE); nothing else lives there.
OPERATOR_NAMESPACE = "training-operator-system"
WEBHOOK_SECRET = "training-operator-webhook-cert"
# Fixed in v1.8.1 (pkg/cert): where the rotator expects the serving certificate.
CERT_DIR = "k8s-webhook-server/serving-certs"
CRD_FILE = "manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
CRD_NAME = "pytorchjobs.kubeflow.org"


class TrainingOperatorError(RuntimeError):
    """The training-operator could not be installed or did not come up; the message says why."""


def module_dir() -> Path:
    """The training-operator's module in the Go module cache, at the version the tools module pins."""
    try:
        return go_module_dir("training-operator", MODULE, TRAINING_OPERATOR_VERSION, CRD_FILE)
    except RuntimeError as exc:
        raise TrainingOperatorError(str(exc)) from None


def crd_document(module: Path) -> dict[str, Any]:
    """The PyTorchJob CRD as the release ships it, less its placeholder `status` (null conditions,
    which make `kubectl wait --for=condition=Established` fail before the apiserver fills them)."""
    document = yaml.safe_load((module / CRD_FILE).read_text())
    document.pop("status", None)
    return document


def pytorchjob_manifest(name: str, namespace: str, workers: int, image: str,
                        command: Sequence[str], restart_policy: str = "OnFailure") -> dict[str, Any]:
    """A PyTorchJob of `workers` pods, all of replica type Worker, each running `command`.

    No Master: with one, v1.8.1 gives every worker an init container that waits for the master
    with `nslookup`, which needs a DNS server (the process node serves names from /etc/hosts)
    and would measure that wait rather than the controller. `restart_policy` is the replicas'
    (Kubeflow's default OnFailure; ExitCode makes the controller recreate failed pods itself)."""
    if workers < 1:
        raise ValueError(f"workers: {workers} — a PyTorchJob needs at least one worker")
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"pytorchReplicaSpecs": {"Worker": {
            "replicas": workers,
            "restartPolicy": restart_policy,
            "template": {"spec": {"containers": [{
                # The controller finds the training container by this name (ports, env).
                "name": "pytorch", "image": image, "command": list(command),
            }]}},
        }}},
    }


def _serving_certificate(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    ca = certs.KeyPair(directory / "ca.crt", directory / "ca.key")
    ca_key, ca_cert = certs._make_ca(ca, "localcluster-training-operator-ca")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "training-operator-webhook")])
    certs._issue(certs.KeyPair(directory / "tls.crt", directory / "tls.key"), ca_key, ca_cert,
                 subject, server=True, dns_names=("localhost",), ips=("127.0.0.1",))


def _private_tmp_argv(state: Path, argv: list[str]) -> list[str]:
    """argv in a private mount namespace whose /tmp is the host's /tmp overlaid (upper layer on a
    tmpfs mounted over `state/tmp-layer`) with the serving certificate at CERT_DIR."""
    layer = state / "tmp-layer"
    layer.mkdir(parents=True, exist_ok=True)
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare.insert(1, "--map-root-user")
    certs_dir = state / "certs"
    script = (
        f'mount -t tmpfs -o size=4m,mode=0700 tmpfs "{layer}" '
        f'&& mkdir -p "{layer}/upper/{CERT_DIR}" "{layer}/work" '
        f'&& cp "{certs_dir}/tls.crt" "{certs_dir}/tls.key" "{layer}/upper/{CERT_DIR}/" '
        f'&& mount -t overlay overlay -o lowerdir=/tmp,upperdir="{layer}/upper",workdir="{layer}/work" /tmp '
        '&& exec "$@"'
    )
    return [*unshare, "sh", "-c", script, "training-operator", *argv]


def _wait_established(kubectl: Callable[..., subprocess.CompletedProcess], timeout: float) -> None:
    # Polled rather than `kubectl wait`, which fails at once on a CRD whose conditions the
    # apiserver has not filled in yet.
    deadline = time.monotonic() + timeout
    query = '{.status.conditions[?(@.type=="Established")].status}'
    while kubectl("get", "crd", CRD_NAME, "-o", f"jsonpath={query}").stdout.strip() != "True":
        if time.monotonic() > deadline:
            raise TrainingOperatorError(f"CRD {CRD_NAME} not Established after {timeout:.0f} s")
        time.sleep(0.3)


@dataclass
class TrainingOperator:
    """A running training-operator controller."""

    record: processes.DaemonRecord
    state_dir: Path

    @property
    def log(self) -> Path:
        return Path(self.record.log)

    @property
    def pid(self) -> int:
        return self.record.pid


def install(kubectl: Callable[..., subprocess.CompletedProcess], kubeconfig: Path, state_dir: Path,
            log: Callable[[str], None] = print, timeout: float = 120.0,
            controller_threads: int = 1) -> TrainingOperator:
    """Build (cached) and start the training-operator against the cluster `kubeconfig` points at.

    `kubectl(*args, input=..., check=True)` runs the cluster's kubectl. Installs the PyTorchJob
    CRD and returns once the controller reports ready (its PyTorchJob controller is then set up).
    `controller_threads` is its --controller-threads (its default 1, as the release ships)."""
    binary = build_training_operator(log).training_operator
    module = module_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    _serving_certificate(state_dir / "certs")
    webhook_port, health_port = processes.free_loopback_ports(2)

    kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(crd_document(module)),
            check=True)
    _wait_established(kubectl, timeout)
    kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    kubectl("create", "secret", "generic", WEBHOOK_SECRET, "-n", OPERATOR_NAMESPACE, check=False)

    argv = [str(binary), f"--kubeconfig={kubeconfig}", "--enable-scheme=pytorchjob",
            f"--controller-threads={controller_threads}",
            "--metrics-bind-address=0",  # off: nothing scrapes it, and a fixed port would collide
            f"--health-probe-bind-address=127.0.0.1:{health_port}",
            f"--webhook-server-port={webhook_port}", "--zap-devel=false", "--zap-log-level=info"]
    env = {key: value for key, value in os.environ.items() if key != "TMPDIR"}
    env.update({"MY_POD_NAMESPACE": OPERATOR_NAMESPACE, "KUBECONFIG": str(kubeconfig)})
    record = processes.start_daemon("training-operator", _private_tmp_argv(state_dir, argv),
                                    state_dir / "training-operator.log", state_dir / "pids", env=env)
    deadline = time.monotonic() + timeout
    try:
        while not processes.http_ok(f"http://127.0.0.1:{health_port}/readyz"):
            if not processes.is_running(record):
                raise TrainingOperatorError(
                    f"the training-operator exited while starting:\n{processes.log_tail(record.log)}")
            if time.monotonic() > deadline:
                raise TrainingOperatorError(
                    f"the training-operator was not ready after {timeout:.0f} s:\n"
                    f"{processes.log_tail(record.log)}")
            time.sleep(0.3)
    except BaseException:   # pytest.fail from the caller's kubectl is not an Exception
        processes.stop_daemon(record)
        raise
    return TrainingOperator(record, state_dir)


def uninstall(operator: TrainingOperator,
              kubectl: Callable[..., subprocess.CompletedProcess] | None = None) -> None:
    """Stop the controller; with `kubectl`, also remove its namespace (the CRD stays: deleting
    it would delete every PyTorchJob with it)."""
    processes.stop_daemon(operator.record)
    if kubectl is not None:
        kubectl("delete", "namespace", OPERATOR_NAMESPACE, "--ignore-not-found", "--wait=false",
                check=False)
