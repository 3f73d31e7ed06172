"""`lorakube wait-job`: follow one LoRATrainingJob until it ends, for scripts and `helm test`.

It only reads the job (GET; the helm-test pod's Role allows nothing else). The verdict is a pure
function of the job's status, so the exit codes are tested without a cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from lorakube_api import contract
from lorakube import status as st

log = logging.getLogger(__name__)

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2          # argparse's own code
EXIT_TIMED_OUT = 3

# (namespace, name) -> the job's body, or None when it does not exist.
Reader = Callable[[str, str], "Mapping[str, Any] | None"]


def failure_text(status: Mapping[str, Any]) -> str:
    """Why a Failed job failed, from what the operator wrote: the Failed condition's reason and
    message, and the last pod failure."""
    parts = []
    failed = st.condition(status.get("conditions") or [], st.FAILED)
    if failed:
        parts.append(f"{failed.get('reason') or 'Failed'}: {failed.get('message') or ''}".rstrip(": "))
    last = status.get("lastFailure") or {}
    if last:
        pod = last.get("pod") or "a pod"
        parts.append(f"last pod failure: {pod} exit code {last.get('exitCode')} "
                     f"({last.get('reason') or 'unknown reason'}): {last.get('message') or ''}".rstrip(": "))
    return "; ".join(parts) or "no reason recorded"


def verdict(job: Mapping[str, Any] | None) -> tuple[int | None, str]:
    """(exit code, message) once the job has ended; (None, progress text) while it runs."""
    if job is None:
        return None, "not found (yet)"
    status = job.get("status") or {}
    phase = status.get("phase")
    if phase == st.SUCCEEDED_PHASE:
        return EXIT_SUCCEEDED, "Succeeded"
    if phase == st.FAILED:
        return EXIT_FAILED, f"Failed: {failure_text(status)}"
    progress = (status.get("progress") or {}).get("text")
    if phase == st.STAGING:     # the text is rank 0's download then ("model 12.5/340.2 MiB")
        return None, f"{phase}" + (f", {progress}" if progress else "")
    return None, f"{phase or 'no phase yet'}" + (f", step {progress}" if progress else "")


def wait(read: Reader, namespace: str, name: str, timeout: float, interval: float = 2.0,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    """Poll the job until it ends or `timeout` passes; returns the exit code. API errors are
    logged and retried until the timeout (the apiserver may be briefly unreachable)."""
    deadline = clock() + timeout
    said = None
    while True:
        try:
            code, message = verdict(read(namespace, name))
        except Exception as exc:  # noqa: BLE001 - an API error or a timeout: try again
            code, message = None, f"reading the job failed: {exc}"
        if message != said:
            log.info("%s %s/%s: %s", contract.KIND, namespace, name, message)
            said = message
        if code is not None:
            return code
        if clock() >= deadline:
            log.error("%s %s/%s did not finish within %g s (last seen: %s)", contract.KIND, namespace, name,
                      timeout, message)
            return EXIT_TIMED_OUT
        sleep(interval)


def reader() -> Reader:
    """GET the job with the in-cluster credentials (or $KUBECONFIG)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from lorakube import kube

    custom = client.CustomObjectsApi(kube.load_api_client(user_agent="lorakube-wait-job"))

    def read(namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            return custom.get_namespaced_custom_object(contract.API_GROUP, contract.API_VERSION, namespace,
                                                       contract.PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
    return read
