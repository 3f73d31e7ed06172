"""Rank 0's progress: contract.Progress JSON lines on stdout and, when asked, merge-patches of its
own LoRATrainingJob's status.progress through the status subresource.

Plain urllib with the pod's ServiceAccount token: the trainer image carries no Kubernetes client.
The token is a projected, expiring one that the kubelet rewrites before it expires, so it is read
from its file for every request, never kept. A failing API call never fails training; it is logged
once and retried at the next report; the last report and the artifact list are retried with
backoff, since no later report replaces them.

Only rank 0 has a token (the operator mounts none into the other ranks), and its account may patch
only its own job's status, and there only `status.progress` and `status.artifacts`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, TextIO

from lorakube_api import contract

from .metrics_server import TrainingMetrics

log = logging.getLogger(__name__)

SERVICEACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Tries for the writes a user relies on once the run is over (the last step, status.artifacts);
# with the default 2 s backoff they ride out about half a minute of API trouble.
FINAL_WRITE_ATTEMPTS = 5


@dataclasses.dataclass(frozen=True)
class ApiTarget:
    base_url: str            # https://host:port
    token_file: str          # re-read for every request: the kubelet rotates it
    ca_file: str | None
    namespace: str
    job_name: str

    def token(self) -> str:
        return Path(self.token_file).read_text().strip()

    @property
    def status_url(self) -> str:
        return (f"{self.base_url}/apis/{contract.API_GROUP}/{contract.API_VERSION}/namespaces/{self.namespace}/"
                f"{contract.PLURAL}/{self.job_name}/status")


def api_target_from_env(env: Mapping[str, str], sa_dir: Path = SERVICEACCOUNT_DIR) -> ApiTarget | None:
    """The in-cluster API endpoint and credentials, or None (with a warning) when incomplete."""
    if env.get(contract.ENV_REPORT_PROGRESS) != "1":
        return None
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    name, namespace = env.get(contract.ENV_JOB_NAME), env.get(contract.ENV_JOB_NAMESPACE)
    token_file = sa_dir / "token"
    missing = [n for n, v in (("KUBERNETES_SERVICE_HOST", host), (contract.ENV_JOB_NAME, name),
                              (contract.ENV_JOB_NAMESPACE, namespace)) if not v]
    if not token_file.is_file():
        missing.append(str(token_file))
    if missing:
        log.warning("%s=1 but %s missing: progress goes to stdout only", contract.ENV_REPORT_PROGRESS,
                    ", ".join(missing))
        return None
    host_part = f"[{host}]" if ":" in host else host      # IPv6 service address
    ca = sa_dir / "ca.crt"
    return ApiTarget(base_url=f"https://{host_part}:{port}", token_file=str(token_file),
                     ca_file=str(ca) if ca.is_file() else None, namespace=namespace, job_name=name)


class StatusPatcher:
    def __init__(self, target: ApiTarget, timeout_s: float = 10.0, backoff_s: float = 2.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._warned = False
        if target.base_url.startswith("https://"):
            self._context = ssl.create_default_context(cafile=target.ca_file)
        else:
            self._context = None

    def patch(self, progress: contract.Progress, attempts: int = 1) -> bool:
        return self.patch_status({"progress": progress.to_status()}, attempts)

    def patch_status(self, fields: dict[str, object], attempts: int = 1) -> bool:
        """Merge-patch these top-level status fields; False (warned once) when the API call fails.
        With `attempts` > 1, a transient failure (timeout, connection refused, 408/429/5xx) is
        retried with exponential backoff; a refusal (403, 422, ...) is not."""
        body = json.dumps({"status": fields}).encode()
        for attempt in range(attempts):
            try:
                request = urllib.request.Request(
                    self.target.status_url, data=body, method="PATCH",
                    headers={"Content-Type": "application/merge-patch+json",
                             "Authorization": f"Bearer {self.target.token()}", "Accept": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context) as response:
                    response.read()
                return True
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = attempt + 1 >= attempts or not _transient(exc)
                if last:
                    self._warn(exc, attempt + 1)
                    return False
                time.sleep(self.backoff_s * 2 ** attempt)
        return False

    def _warn(self, exc: BaseException, tries: int) -> None:
        if tries > 1:   # a write the user relies on: always say it was lost
            log.warning("could not patch %s after %d tries: %s", self.target.status_url, tries, exc)
        elif not self._warned:
            self._warned = True
            log.warning("could not patch %s (training goes on; further failures are not logged): %s",
                        self.target.status_url, exc)


def _transient(exc: BaseException) -> bool:
    """What may pass by itself: a busy or restarting API server, a timeout, a dropped connection.
    A token that is gone (FileNotFoundError) or a refused patch will not."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (408, 429) or exc.code >= 500
    if isinstance(exc, FileNotFoundError):
        return False
    return isinstance(exc, (urllib.error.URLError, OSError))


class ProgressReporter:
    """Rate-limited: at most one stdout line and one patch per interval, plus the first and the last."""

    def __init__(self, total_steps: int, *, interval_s: float, out: TextIO | None = None,
                 patcher: StatusPatcher | None = None, clock: Callable[[], float] = time.monotonic,
                 live: TrainingMetrics | None = None) -> None:
        self.total_steps = total_steps
        # Rank 0's /metrics: every step is recorded there, whatever the rate limit lets through.
        self.live = live
        self.interval_s = interval_s
        self.out = out if out is not None else sys.stdout
        self.patcher = patcher
        self.clock = clock
        self._last_sent: float | None = None
        self._first_step: int | None = None
        self._first_time: float | None = None

    def _rates(self, step: int, samples_per_step: int) -> tuple[float | None, float | None]:
        now = self.clock()
        if self._first_step is None:
            self._first_step, self._first_time = step, now
            return None, None
        steps = step - self._first_step
        elapsed = now - self._first_time
        if steps <= 0 or elapsed <= 0:
            return None, None
        per_step = elapsed / steps
        return samples_per_step / per_step, per_step * (self.total_steps - step)

    def report(self, step: int, epoch: int, loss: float | None, samples_per_step: int, *, force: bool = False) -> bool:
        samples_per_second, eta = self._rates(step, samples_per_step)
        if self.live is not None:
            self.live.update(step=step, total_steps=self.total_steps, epoch=epoch, loss=loss,
                             samples_per_second=samples_per_second)
        now = self.clock()
        final = step >= self.total_steps
        if not (force or final or self._last_sent is None or now - self._last_sent >= self.interval_s):
            return False
        self._last_sent = now
        progress = contract.Progress(step=step, totalSteps=self.total_steps, epoch=epoch, loss=loss,
                                     samplesPerSecond=samples_per_second, etaSeconds=0.0 if final else eta,
                                     updatedAt=contract.utc_now_iso())
        print(progress.to_json_line(), file=self.out, flush=True)
        if self.patcher is not None:
            # The last step is what `kubectl get ltj` keeps showing: retry it through a transient
            # API outage; any other report is replaced by the next one.
            self.patcher.patch(progress, FINAL_WRITE_ATTEMPTS if final else 1)
        return True


def publish_artifacts(output_uri: str, files: dict[str, dict[str, object]],
                      env: Mapping[str, str] | None = None,
                      also: Mapping[str, dict[str, dict[str, object]]] | None = None) -> bool:
    """Rank 0, after the manifest is written: list every published file with its sha256 and size in
    status.artifacts, so `kubectl get ltj -o yaml` says where the LoRA is and how to verify it.
    `also`: other destinations (a ModelScope repo) -> the files verified there."""
    target = api_target_from_env(os.environ if env is None else env)
    if target is None:
        return False
    entries = contract.artifacts_status(output_uri, files)
    for uri, more in (also or {}).items():
        entries += contract.artifacts_status(uri, more)
    # Written once, after the run: a lost write would leave a Succeeded job without its artifact list.
    return StatusPatcher(target).patch_status({"artifacts": entries}, FINAL_WRITE_ATTEMPTS)


def reporter_from_env(total_steps: int, env: Mapping[str, str] | None = None,
                      live: TrainingMetrics | None = None) -> ProgressReporter:
    env = os.environ if env is None else env
    raw = env.get(contract.ENV_PROGRESS_INTERVAL)
    try:
        interval = float(raw) if raw else contract.DEFAULT_PROGRESS_INTERVAL_SECONDS
    except ValueError:
        log.warning("%s=%r is not a number; using %s s", contract.ENV_PROGRESS_INTERVAL, raw,
                    contract.DEFAULT_PROGRESS_INTERVAL_SECONDS)
        interval = contract.DEFAULT_PROGRESS_INTERVAL_SECONDS
    target = api_target_from_env(env)
    return ProgressReporter(total_steps, interval_s=interval, patcher=None if target is None else StatusPatcher(target),
                            live=live)
