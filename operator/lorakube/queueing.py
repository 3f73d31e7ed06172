"""Kueue admission through plain pod groups: what the pods carry, and how to read a Workload.

A job labelled `kueue.x-k8s.io/queue-name` runs each attempt as one Kueue pod group named
`<job>-<attempt>`: every pod carries the queue and group labels and the group's size, Kueue's
webhook gates the pods, Kueue creates a Workload of that name and lifts the gates only when the
whole group fits the queue's quota. docs/operator.md ("Kueue") says why this integration and not a
pre-built Workload.

Every pod is also annotated `retriable-in-group: "false"`: the operator never replaces single
pods (a failure restarts the whole gang as a new attempt, i.e. a new group), so Kueue must not hold
quota or finalizers waiting for replacements; the group's Workload finishes, and its quota is
released, as soon as every pod has ended.

Pure: no API calls. kube.py reads the Workload; reconcile.decide reads the view below.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from lorakube.pods import parse_time

QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
POD_GROUP_NAME_LABEL = "kueue.x-k8s.io/pod-group-name"
POD_GROUP_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
RETRIABLE_IN_GROUP_ANNOTATION = "kueue.x-k8s.io/retriable-in-group"
# The scheduling gate Kueue's webhook adds and removes on admission, and the finalizer it keeps on
# the pods of a group until the group's Workload is finished.
ADMISSION_GATE = "kueue.x-k8s.io/admission"
POD_FINALIZER = "kueue.x-k8s.io/managed"

WORKLOAD_GROUP = "kueue.x-k8s.io"
WORKLOAD_VERSION = "v1beta2"
WORKLOAD_PLURAL = "workloads"

# A condition reason must be CamelCase for the CRD; Kueue's reasons are, but a future one may not.
_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_]*[A-Za-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class QueueSpec:
    """Where the job queues: a LocalQueue in its namespace, and an optional
    WorkloadPriorityClass."""

    queue_name: str
    priority_class: str | None = None


def queue_from_labels(labels: Mapping[str, str] | None) -> QueueSpec | None:
    labels = labels or {}
    name = labels.get(QUEUE_NAME_LABEL)
    if not name:
        return None
    return QueueSpec(queue_name=name, priority_class=labels.get(PRIORITY_CLASS_LABEL) or None)


def group_name(job_name: str, attempt: int) -> str:
    """The pod group (and Workload) of one attempt. Unique per job and attempt (the attempt is the
    part after the last '-'), and within 63 characters: job names are at most 54."""
    return f"{job_name}-{attempt}"


def pod_labels(queue: QueueSpec, job_name: str, attempt: int) -> dict[str, str]:
    labels = {QUEUE_NAME_LABEL: queue.queue_name, POD_GROUP_NAME_LABEL: group_name(job_name, attempt)}
    if queue.priority_class:
        labels[PRIORITY_CLASS_LABEL] = queue.priority_class
    return labels


def pod_annotations(num_nodes: int) -> dict[str, str]:
    return {POD_GROUP_TOTAL_COUNT_ANNOTATION: str(num_nodes), RETRIABLE_IN_GROUP_ANNOTATION: "false"}


@dataclasses.dataclass(frozen=True)
class WorkloadView:
    """The parts of a Kueue Workload the operator reports."""

    name: str
    quota_reserved: bool = False
    admitted: bool = False
    finished: bool = False
    # Why it waits: the QuotaReserved=False condition's reason and message (e.g. Pending,
    # "couldn't assign flavors to pod set ...: insufficient unused quota for cpu ...").
    reason: str | None = None
    message: str | None = None
    admitted_at: dt.datetime | None = None


def _conditions(body: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type"): c for c in (body.get("status") or {}).get("conditions") or []}


def workload_from_body(body: Mapping[str, Any]) -> WorkloadView:
    conditions = _conditions(body)

    def true(type_: str) -> bool:
        return (conditions.get(type_) or {}).get("status") == "True"

    waiting = conditions.get("Evicted") if true("Evicted") else conditions.get("QuotaReserved")
    admitted = conditions.get("Admitted") or {}
    return WorkloadView(
        name=(body.get("metadata") or {}).get("name", ""),
        quota_reserved=true("QuotaReserved"),
        admitted=true("Admitted"),
        finished=true("Finished"),
        reason=(waiting or {}).get("reason"),
        message=(waiting or {}).get("message"),
        admitted_at=parse_time(admitted.get("lastTransitionTime")) if true("Admitted") else None,
    )


def waiting_reason(queue: QueueSpec, group: str, workload: WorkloadView | None) -> tuple[str, str]:
    """The Queued condition's reason and message while the group's pods are gated."""
    where = f"LocalQueue {queue.queue_name!r}, workload {group}"
    if workload is None:
        return "WaitingForWorkload", f"waiting for Kueue to create the workload ({where})"
    if workload.quota_reserved and not workload.admitted:
        return "WaitingForAdmissionChecks", f"quota reserved, waiting for admission checks ({where})"
    reason = workload.reason if workload.reason and _REASON.match(workload.reason) else "Queued"
    detail = f": {workload.message}" if workload.message else ""
    return reason, f"waiting in {where}{detail}"
