"""Pod status as kubelet would report it, computed from what the node observed (pure)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRun:
    name: str
    image: str
    init: bool
    state: str = "waiting"  # waiting | running | terminated
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    pid: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None

    def terminate(self, exit_code: int, reason: str, message: str | None = None) -> None:
        self.state = "terminated"
        self.exit_code = exit_code
        self.reason = reason
        self.message = message
        self.finished_at = now_rfc3339()

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.name, "image": self.image, "imageID": "",
            "restartCount": 0, "ready": self.state == "running",
            "started": self.state == "running",
        }
        if self.pid is not None:
            status["containerID"] = f"process://{self.pid}"
        if self.state == "waiting":
            waiting: dict[str, Any] = {"reason": self.waiting_reason}
            if self.waiting_message:
                waiting["message"] = self.waiting_message
            status["state"] = {"waiting": waiting}
        elif self.state == "running":
            status["state"] = {"running": {"startedAt": self.started_at}}
        else:
            terminated: dict[str, Any] = {
                "exitCode": self.exit_code, "reason": self.reason,
                "startedAt": self.started_at or self.finished_at, "finishedAt": self.finished_at,
            }
            if self.message:
                terminated["message"] = self.message
            if self.pid is not None:
                terminated["containerID"] = f"process://{self.pid}"
            status["state"] = {"terminated": terminated}
        return status


def reason_for_exit(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


@dataclass
class PodRun:
    """What the node knows about one pod it runs."""

    uid: str
    namespace: str
    name: str
    containers: list[ContainerRun] = field(default_factory=list)
    pod_ip: str | None = None
    host_ip: str | None = None
    start_time: str | None = None
    sandbox_ready: bool = False
    phase_override: str | None = None  # e.g. Failed on node shutdown / restart
    reason: str | None = None
    message: str | None = None
    disruption: dict[str, Any] | None = None
    # condition type -> (status, lastTransitionTime): a time changes only with its status
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def init_containers(self) -> list[ContainerRun]:
        return [c for c in self.containers if c.init]

    @property
    def main_containers(self) -> list[ContainerRun]:
        return [c for c in self.containers if not c.init]

    def init_failed(self) -> ContainerRun | None:
        return next((c for c in self.init_containers
                     if c.state == "terminated" and c.exit_code != 0), None)

    def initialized(self) -> bool:
        return all(c.state == "terminated" and c.exit_code == 0 for c in self.init_containers)

    def phase(self) -> str:
        if self.phase_override:
            return self.phase_override
        if self.init_failed():
            return "Failed"
        mains = self.main_containers
        if mains and all(c.state == "terminated" for c in mains):
            return "Succeeded" if all(c.exit_code == 0 for c in mains) else "Failed"
        if any(c.state in ("running", "terminated") for c in mains):
            return "Running"
        return "Pending"

    def terminal(self) -> bool:
        return self.phase() in ("Succeeded", "Failed")

    def failure_message(self) -> str | None:
        if self.message:
            return self.message
        failed = [c for c in self.containers if c.state == "terminated" and c.exit_code]
        if not failed or self.phase() != "Failed":
            return None
        return "; ".join(f"container {c.name} exited with code {c.exit_code} ({c.reason})"
                         for c in failed)

    def to_status(self) -> dict[str, Any]:
        stamp = now_rfc3339()
        phase = self.phase()
        mains = self.main_containers
        all_running = bool(mains) and all(c.state == "running" for c in mains)
        if phase in ("Succeeded", "Failed"):
            not_ready = "PodCompleted"
        else:
            not_ready = "ContainersNotReady"
        ready = "True" if all_running and phase == "Running" else "False"

        def cond(kind: str, value: bool | str, reason: str | None = None) -> dict[str, Any]:
            status = value if isinstance(value, str) else ("True" if value else "False")
            previous = self.transitions.get(kind)
            since = previous[1] if previous and previous[0] == status else stamp
            self.transitions[kind] = (status, since)
            entry: dict[str, Any] = {"type": kind, "status": status, "lastTransitionTime": since,
                                     "lastProbeTime": None}
            if reason and status != "True":
                entry["reason"] = reason
            return entry

        conditions = [
            cond("PodReadyToStartContainers", self.sandbox_ready and phase not in
                 ("Succeeded", "Failed")),
            cond("Initialized", self.initialized() or phase in ("Succeeded",),
                 "ContainersNotInitialized"),
            cond("ContainersReady", ready, not_ready),
            cond("Ready", ready, not_ready),
        ]
        if self.disruption:
            conditions.append({**self.disruption, "lastTransitionTime": stamp,
                               "lastProbeTime": None})
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": [c.to_status() for c in mains],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.to_status() for c in self.init_containers]
        if self.pod_ip:
            status["podIP"] = self.pod_ip
            status["podIPs"] = [{"ip": self.pod_ip}]
        if self.host_ip:
            status["hostIP"] = self.host_ip
            status["hostIPs"] = [{"ip": self.host_ip}]
        if self.start_time:
            status["startTime"] = self.start_time
        message = self.failure_message()
        if message:
            status["message"] = message
        if self.reason:
            status["reason"] = self.reason
        return status
