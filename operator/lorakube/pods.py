"""What the operator needs to know about one trainer pod, read once from the pod body.

The Kopf index keeps these small frozen views instead of whole pod bodies, and every decision
reads them, so the pod's wire format is interpreted in this one place.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from lorakube_api import contract

PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"


@dataclasses.dataclass(frozen=True)
class PodView:
    name: str
    rank: int
    attempt: int
    owner_uid: str | None
    phase: str
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    node_name: str | None = None
    pod_ip: str | None = None   # a peer's timeout message may name it by IP (nodes.attribute)
    created_at: dt.datetime | None = None
    deleting: bool = False
    disrupted: bool = False   # the DisruptionTarget condition: evicted, preempted, node going away
    # While deleting: metadata.deletionTimestamp (the request's time plus the grace period, when
    # the kubelet should have confirmed), deletionGracePeriodSeconds, and the finalizers that hold
    # the object; what a restart waiting for this pod reports.
    deletion_due: dt.datetime | None = None
    deletion_grace_seconds: int | None = None
    finalizers: tuple[str, ...] = ()
    # Held back from scheduling by a scheduling gate (Kueue's, until the pod's group is admitted).
    gated: bool = False
    # metadata.uid: the names repeat across attempts, the uid names this pod object alone.
    uid: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in (SUCCEEDED, FAILED)

    @property
    def active(self) -> bool:
        """Still holding (or about to hold) a node's resources."""
        return not self.finished and not self.deleting


def parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _trainer_state(status: Mapping[str, Any]) -> Mapping[str, Any]:
    for container in status.get("containerStatuses") or []:
        if container.get("name") == contract.TRAINER_CONTAINER:
            return container.get("state") or {}
    return {}


def from_body(body: Mapping[str, Any]) -> PodView | None:
    """A view of a trainer pod, or None for a pod without our rank/attempt labels."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        rank = int(labels[contract.LABEL_RANK])
        attempt = int(labels[contract.LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None
    owner_uid = next(
        (ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None
    )
    status = body.get("status") or {}
    state = _trainer_state(status)
    terminated = state.get("terminated") or {}
    waiting = state.get("waiting") or {}
    conditions = status.get("conditions") or []
    return PodView(
        name=meta.get("name", ""),
        rank=rank,
        attempt=attempt,
        owner_uid=owner_uid,
        phase=status.get("phase") or PENDING,
        exit_code=terminated.get("exitCode"),
        reason=terminated.get("reason") or waiting.get("reason") or status.get("reason"),
        message=terminated.get("message") or waiting.get("message") or status.get("message"),
        node_name=(body.get("spec") or {}).get("nodeName"),
        pod_ip=status.get("podIP"),
        created_at=parse_time(meta.get("creationTimestamp")),
        deleting=bool(meta.get("deletionTimestamp")),
        # DisruptionTarget: evicted, preempted by the scheduler, node going away; TerminationTarget:
        # Kueue stopped the pod's group (preempted or evicted from its queue). Neither is the job's fault.
        disrupted=any(c.get("type") in ("DisruptionTarget", "TerminationTarget") and c.get("status") == "True"
                      for c in conditions),
        deletion_due=parse_time(meta.get("deletionTimestamp")),
        deletion_grace_seconds=meta.get("deletionGracePeriodSeconds"),
        finalizers=tuple(meta.get("finalizers") or ()),
        gated=bool((body.get("spec") or {}).get("schedulingGates")),
        uid=meta.get("uid"),
    )
