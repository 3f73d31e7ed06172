"""The pieces `lorakube-dev demo` and the end-to-end tests share: install the API and RBAC on a
cluster, run the operator under its own ServiceAccount token, prepare the quickstart data, and
follow a job until it ends.

It drives the cluster the way a user would: kubectl with the manifests from this repository, the
operator as a separate `lorakube operator` process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import lorakube
import lorakube_api
from lorakube import status as st
from lorakube_api import contract

# The shipped manifests come from the installed packages; the quickstart and its dataset are the
# repository's examples (the dev tools run from a source checkout and are never shipped).
CRD_FILE = lorakube_api.crd_path()
OPERATOR_MANIFESTS = Path(lorakube.__file__).resolve().parent / "manifests"
RBAC_OPERATOR = OPERATOR_MANIFESTS / "rbac-operator.yaml"
TRAINER_STATUS_POLICY = OPERATOR_MANIFESTS / "trainer-status-policy.yaml"
REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
EXAMPLE_DATASET = REPO_ROOT / "examples" / "dataset"
OPERATOR_NAMESPACE = "lorakube-system"
OPERATOR_SERVICE_ACCOUNT = "lorakube-operator"

# cluster.kubectl-like: (*args, input=None, kubeconfig=None) -> CompletedProcess
Kubectl = Callable[..., subprocess.CompletedProcess]


class SandboxError(RuntimeError):
    """The demo or e2e sandbox could not be set up; the message says which step and why."""


def _run(kubectl: Kubectl, *args: str, input: str | None = None) -> str:
    result = kubectl(*args, input=input)
    if result.returncode != 0:
        raise SandboxError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def _require(path: Path) -> Path:
    if not path.exists():
        raise SandboxError(f"{path} is missing; run this from a lorakube source checkout")
    return path


def install(kubectl: Kubectl, job_namespace: str) -> None:
    """The CRD, the operator's RBAC and the trainer-status policy, and a job namespace. Nothing
    per namespace: the operator gives every job its own trainer account and Role."""
    _run(kubectl, "apply", "--server-side", "-f", str(_require(CRD_FILE)))
    _wait_established(kubectl, f"{contract.PLURAL}.{contract.API_GROUP}")
    _run(kubectl, "apply", "-f", str(_require(RBAC_OPERATOR)))
    _run(kubectl, "apply", "-f", str(_require(TRAINER_STATUS_POLICY)))
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": job_namespace}}
    _run(kubectl, "apply", "-f", "-", input=yaml.safe_dump(namespace))


def _wait_established(kubectl: Kubectl, crd: str, timeout: float = 60.0) -> None:
    # Polled rather than `kubectl wait`, which errors out while a fresh CRD has no conditions yet.
    query = '{.status.conditions[?(@.type=="Established")].status}'
    deadline = time.monotonic() + timeout
    while kubectl("get", "crd", crd, "-o", f"jsonpath={query}").stdout.strip() != "True":
        if time.monotonic() > deadline:
            raise SandboxError(f"the CRD {crd} was not Established after {timeout:.0f}s")
        time.sleep(0.2)


def operator_token(kubectl: Kubectl, duration: str = "4h") -> str:
    """A TokenRequest token of the operator's ServiceAccount: the operator gets exactly the RBAC
    the manifests grant, as it would in the cluster."""
    return _run(kubectl, "create", "token", OPERATOR_SERVICE_ACCOUNT, "-n", OPERATOR_NAMESPACE,
                f"--duration={duration}").strip()


def prepare_data(data_dir: Path, log: Callable[[str], None] = print) -> Path:
    """<data>/model (tiny FLUX, built once), <data>/dataset (the example), <data>/output."""
    data_dir.mkdir(parents=True, exist_ok=True)
    model = data_dir / "model"
    if not (model / "model_index.json").is_file():
        log(f"building the tiny FLUX pipeline in {model}")
        built = subprocess.run(
            [sys.executable, "-m", "lorakube_dev.tiny", "--family", "flux", "--out", str(model)],
            capture_output=True, text=True)
        if built.returncode != 0:
            raise SandboxError(f"building the tiny model failed:\n{built.stderr[-2000:]}")
    dataset = data_dir / "dataset"
    if dataset.exists():
        shutil.rmtree(dataset)
    shutil.copytree(_require(EXAMPLE_DATASET), dataset)
    output = data_dir / "output"
    output.mkdir(exist_ok=True)
    # The pods run as a non-root user (builders.TRAINER_UID); they must be able to write here.
    for path in (data_dir, output):
        path.chmod(0o777)
    return data_dir


def quickstart_job(data_dir: Path, name: str = "quickstart", **spec_overrides: Any) -> dict[str, Any]:
    """examples/quickstart.yaml with its hostPath pointed at `data_dir`."""
    job = yaml.safe_load(_require(QUICKSTART).read_text())
    job["metadata"]["name"] = name
    job["spec"]["output"]["uri"] = f"/data/output/{name}"
    for volume in job["spec"]["resources"]["volumes"]:
        if "hostPath" in volume:
            volume["hostPath"]["path"] = str(data_dir)
    for section, values in spec_overrides.items():
        job["spec"].setdefault(section, {}).update(values)
    return job


def apply_job(kubectl: Kubectl, namespace: str, job: Mapping[str, Any]) -> None:
    _run(kubectl, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(dict(job)))


def get_job(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    result = kubectl("get", contract.SHORT_NAME, name, "-n", namespace, "-o", "json")
    return json.loads(result.stdout) if result.returncode == 0 else None


def follow(kubectl: Kubectl, namespace: str, name: str, timeout: float,
           on_change: Callable[[dict[str, Any]], None] = lambda status: None,
           interval: float = 1.0) -> dict[str, Any]:
    """Poll the job until it is Succeeded or Failed; `on_change(status)` sees every new
    (phase, progress) pair. Returns the final job body."""
    deadline = time.monotonic() + timeout
    seen: tuple[Any, ...] | None = None
    while True:
        body = get_job(kubectl, namespace, name) or {}
        status = body.get("status") or {}
        marker = (status.get("phase"), json.dumps(status.get("progress"), sort_keys=True),
                  status.get("readyNodes"), status.get("attempt"))
        if marker != seen:
            seen = marker
            on_change(status)
        if status.get("phase") in st.TERMINAL_PHASES:
            return body
        if time.monotonic() > deadline:
            raise SandboxError(f"job {namespace}/{name} did not finish within {timeout:.0f}s "
                               f"(phase {status.get('phase')!r})")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class OperatorProcess:
    """`lorakube operator --all-namespaces` (or other `args`) as a child process with its own
    kubeconfig. Its HTTP endpoints (/metrics, /healthz, /readyz) listen on a free loopback port,
    `http_url`, unless `args` name an --http-address: several operators on one machine must not
    share the in-pod default 0.0.0.0:8080."""

    def __init__(self, kubeconfig: Path, log_path: Path, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = ("--all-namespaces",)) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.env = dict(env or {})
        self.args = list(args)
        self.http_url: str | None = None
        if not any(arg.startswith("--http-address") for arg in self.args):
            address = f"127.0.0.1:{free_port()}"
            self.args += ["--http-address", address]
            self.http_url = f"http://{address}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lorakube.cli", "operator", *self.args],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to finish what it was doing."""
        if self.running:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        if not self.running:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
