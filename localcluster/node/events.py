"""Pod events as kubelet records them (Started, Killing, Failed, FailedMount), so
`kubectl describe pod` and `kubectl get events` tell the same story as on a real node."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .kubeapi import ApiError, KubeApi
from .status import now_rfc3339

log = logging.getLogger(__name__)


def event_body(pod_meta: Mapping[str, Any], node: str, reason: str, message: str,
               warning: bool = False, container: str | None = None) -> dict[str, Any]:
    involved: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "name": pod_meta["name"],
                                "namespace": pod_meta["namespace"], "uid": pod_meta["uid"]}
    if container:
        involved["fieldPath"] = f"spec.containers{{{container}}}"
    stamp = now_rfc3339()
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{pod_meta['name']}.", "namespace": pod_meta["namespace"]},
        "involvedObject": involved, "reason": reason, "message": message,
        "type": "Warning" if warning else "Normal",
        "source": {"component": "kubelet", "host": node},
        "reportingComponent": "kubelet", "reportingInstance": node,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    }


def emit(api: KubeApi, pod_meta: Mapping[str, Any], node: str, reason: str, message: str,
         warning: bool = False, container: str | None = None) -> None:
    """Best effort: an event that cannot be written is not worth failing a pod over."""
    try:
        api.create(f"/api/v1/namespaces/{pod_meta['namespace']}/events",
                   event_body(pod_meta, node, reason, message, warning, container))
    except ApiError as exc:
        log.debug("event %s for %s not recorded: %s", reason, pod_meta.get("name"), exc)
