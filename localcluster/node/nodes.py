"""Node objects and their heartbeats (Ready condition + Lease in kube-node-lease)."""

from __future__ import annotations

import datetime
import logging
import platform
import uuid
from typing import Any

from .kubeapi import ApiError, KubeApi
from .nodespec import NodeSpec
from .status import now_rfc3339

log = logging.getLogger(__name__)

LEASE_SECONDS = 40
# The apiserver taints new nodes not-ready; the node-lifecycle controller would lift the taint
# once Ready is reported, but a local control plane runs without that controller (it would
# evict pods on every heartbeat hiccup), so the node lifts the condition taints itself.
CONDITION_TAINTS = frozenset({"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"})


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def conditions(stamp: str) -> list[dict[str, Any]]:
    def cond(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return {"type": kind, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}

    return [
        cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "sufficient memory"),
        cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
        cond("PIDPressure", "False", "KubeletHasSufficientPID", "sufficient PID"),
        cond("Ready", "True", "KubeletReady", "lorakube process node is posting ready status"),
    ]


def node_object(spec: NodeSpec, internal_ip: str, kubelet_port: int, version: str) -> dict[str, Any]:
    stamp = now_rfc3339()
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": _arch(),
        "node.lorakube.io/process-node": "true",
    }
    if spec.gpus:
        labels["nvidia.com/gpu.present"] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels},
        "spec": {},
        "status": {
            "capacity": spec.resources(),
            "allocatable": spec.resources(),
            "conditions": conditions(stamp),
            "addresses": [{"type": "InternalIP", "address": internal_ip},
                          {"type": "Hostname", "address": spec.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, spec.name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, spec.name)),
                "bootID": str(uuid.uuid4()),
                "kernelVersion": platform.release(),
                "osImage": "lorakube process node",
                "containerRuntimeVersion": "process://1",
                "kubeletVersion": version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": _arch(),
            },
        },
    }


def _micro_time() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeRegistry:
    def __init__(self, api: KubeApi, specs: list[NodeSpec], internal_ip: str,
                 kubelet_port: int) -> None:
        self._api = api
        self.specs = specs
        self._ip = internal_ip
        self._port = kubelet_port
        try:
            self._version = api.get("/version").get("gitVersion", "v0.0.0")
        except ApiError:
            self._version = "v0.0.0"

    def register(self) -> None:
        for spec in self.specs:
            self._register_one(spec)
            self._renew_lease(spec)
            self._lift_condition_taints(spec)

    def _lift_condition_taints(self, spec: NodeSpec) -> None:
        node = self._api.get(f"/api/v1/nodes/{spec.name}")
        taints = node.get("spec", {}).get("taints") or []
        kept = [t for t in taints if t.get("key") not in CONDITION_TAINTS]
        if len(kept) != len(taints):
            self._api.patch(f"/api/v1/nodes/{spec.name}", {"spec": {"taints": kept or None}})

    def _register_one(self, spec: NodeSpec) -> None:
        body = node_object(spec, self._ip, self._port, self._version)
        try:
            self._api.create("/api/v1/nodes", body)
            log.info("registered node %s", spec.name)
        except ApiError as exc:
            if exc.status != 409:
                raise
            # A node left by an earlier run: take it over with fresh labels and status.
            self._api.patch(f"/api/v1/nodes/{spec.name}",
                            {"metadata": {"labels": body["metadata"]["labels"]}})
            self._api.patch(f"/api/v1/nodes/{spec.name}/status", {"status": body["status"]},
                            strategic=True)

    def heartbeat(self) -> None:
        stamp = now_rfc3339()
        for spec in self.specs:
            try:
                self._api.patch(f"/api/v1/nodes/{spec.name}/status",
                                {"status": {"conditions": conditions(stamp)}}, strategic=True)
                self._renew_lease(spec)
                self._lift_condition_taints(spec)
            except ApiError as exc:
                if exc.status == 404:
                    log.warning("node %s disappeared; registering it again", spec.name)
                    self._register_one(spec)
                else:
                    log.warning("heartbeat for %s failed: %s", spec.name, exc)

    def _renew_lease(self, spec: NodeSpec) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{spec.name}"
        lease_spec = {"holderIdentity": spec.name, "leaseDurationSeconds": LEASE_SECONDS,
                      "renewTime": _micro_time()}
        try:
            self._api.patch(path, {"spec": lease_spec})
        except ApiError as exc:
            if exc.status != 404:
                raise
            node = self._api.get(f"/api/v1/nodes/{spec.name}")
            owner = {"apiVersion": "v1", "kind": "Node", "name": spec.name,
                     "uid": node["metadata"]["uid"]}
            self._api.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {"metadata": {"name": spec.name, "namespace": "kube-node-lease",
                              "ownerReferences": [owner]}, "spec": lease_spec})

    def deregister(self) -> None:
        for spec in self.specs:
            for path in (f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{spec.name}",
                         f"/api/v1/nodes/{spec.name}"):
                try:
                    self._api.delete(path)
                except ApiError as exc:
                    if exc.status != 404:
                        log.warning("deleting %s failed: %s", path, exc)
