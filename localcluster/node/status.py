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
    restart_count: int = 0
    last_terminated: dict[str, Any] | None = None  # `lastState.terminated` after a restart
    # Probe verdicts: None when the container has no such probe (then running is enough).
    readiness: bool | None = None
    startup: bool | None = None

    @property
    def started(self) -> bool:
        return self.state == "running" and self.startup is not False

    @property
    def ready(self) -> bool:
        return self.started and self.readiness is not False

    def has_run(self) -> bool:
        return self.state in ("running", "terminated") or self.last_terminated is not None

    def terminate(self, exit_code: int, reason: str, message: str | None = None) -> None:
        self.state = "terminated"
        self.exit_code = exit_code
        self.reason = reason
        self.message = message
        self.finished_at = now_rfc3339()

    def await_restart(self, reason: str, message: str = "") -> None:
        """The ended instance becomes `lastState`; the container waits for its next one."""
        self.last_terminated = self._terminated()
        self.state = "waiting"
        self.waiting_reason, self.waiting_message = reason, message
        self.started_at = self.finished_at = None
        self.exit_code = self.reason = self.message = None

    def begin_instance(self, pid: int) -> None:
        """A process for this container was launched: after an ended one, that is a restart."""
        if self.last_terminated is not None:
            self.restart_count += 1
        self.pid = pid

    def _terminated(self) -> dict[str, Any]:
        terminated: dict[str, Any] = {
            "exitCode": self.exit_code, "reason": self.reason,
            "startedAt": self.started_at or self.finished_at, "finishedAt": self.finished_at,
        }
        if self.message:
            terminated["message"] = self.message
        if self.pid is not None:
            terminated["containerID"] = f"process://{self.pid}"
        return terminated

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.name, "image": self.image, "imageID": "",
            "restartCount": self.restart_count, "ready": self.ready, "started": self.started,
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
            status["state"] = {"terminated": self._terminated()}
        status["lastState"] = ({"terminated": self.last_terminated} if self.last_terminated
                               else {})
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
        # A container waiting to be restarted has run: the pod stays Running meanwhile.
        if any(c.has_run() for c in mains):
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
        all_ready = bool(mains) and all(c.ready for c in mains)
        if phase in ("Succeeded", "Failed"):
            not_ready = "PodCompleted"
        else:
            not_ready = "ContainersNotReady"
        ready = "True" if all_ready and phase == "Running" else "False"
        unready = [c.name for c in mains if not c.ready]
        not_ready_message = (f"containers with unready status: [{' '.join(unready)}]"
                             if unready and phase not in ("Succeeded", "Failed") else None)

        def cond(kind: str, value: bool | str, reason: str | None = None,
                 message: str | None = None) -> dict[str, Any]:
            status = value if isinstance(value, str) else ("True" if value else "False")
            previous = self.transitions.get(kind)
            since = previous[1] if previous and previous[0] == status else stamp
            self.transitions[kind] = (status, since)
            entry: dict[str, Any] = {"type": kind, "status": status, "lastTransitionTime": since,
                                     "lastProbeTime": None}
            if reason and status != "True":
                entry["reason"] = reason
                if message:
                    entry["message"] = message
            return entry

        conditions = [
            cond("PodReadyToStartContainers", self.sandbox_ready and phase not in
                 ("Succeeded", "Failed")),
            cond("Initialized", self.initialized() or phase in ("Succeeded",),
                 "ContainersNotInitialized"),
            cond("ContainersReady", ready, not_ready, not_ready_message),
            cond("Ready", ready, not_ready, not_ready_message),
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


# Keys a status may drop between two reports. The node sends its status as a strategic merge
# patch, which merges maps (and list entries by their key) instead of replacing them: a key left
# out keeps its old value. Without explicit nulls a condition that turned True kept the
# ContainersNotReady reason and message of its False days, and a container state kept `waiting`
# next to `running` (kubelet avoids this by diffing old and new status into its patch).
_CONDITION_OPTIONAL = ("reason", "message")
_STATES = ("waiting", "running", "terminated")


def status_patch(status: dict[str, Any]) -> dict[str, Any]:
    """`status` (from PodRun.to_status) as a strategic-merge patch body that also removes what
    the new status no longer has (pure)."""
    patch = dict(status)
    patch["conditions"] = [{**{k: None for k in _CONDITION_OPTIONAL}, **c}
                           for c in status.get("conditions", [])]
    for key in ("containerStatuses", "initContainerStatuses"):
        if key in status:
            patch[key] = [_container_patch(c) for c in status[key]]
    return patch


def _container_patch(container: dict[str, Any]) -> dict[str, Any]:
    state = {k: None for k in _STATES}
    for kind, detail in container.get("state", {}).items():
        # Optional fields inside the current state (a waiting message, a terminated message).
        state[kind] = {**{"message": None}, **detail}
    return {**container, "state": state}
