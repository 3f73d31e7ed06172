"""The job's status: phases, conditions and the fields derived from pods and progress.

The operator owns every status field except `progress` and `artifacts`, which the trainer's
rank 0 writes; nothing here ever puts those two into a patch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lorakube.pods import RUNNING, SUCCEEDED, PodView, format_time

PENDING = "Pending"
CREATED = "Created"
RUNNING_PHASE = "Running"
# All pods run and rank 0 stages the model/dataset into its node's cache (status.progress.staging);
# for everything but the phase name (deadlines, gang health, failures) it counts as Running.
STAGING = "Staging"
RESTARTING = "Restarting"
SUCCEEDED_PHASE = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
# The pods exist but Kueue holds them (scheduling-gated) until the whole gang is admitted.
QUEUED = "Queued"
TERMINAL_PHASES = frozenset({SUCCEEDED_PHASE, FAILED})
# Every pod of the attempt is running.
ACTIVE_PHASES = frozenset({RUNNING_PHASE, STAGING})

# Status keys the operator writes; `progress` and `artifacts` belong to the trainer.
OPERATOR_KEYS = (
    "phase", "conditions", "observedGeneration", "attempt", "restarts", "disruptions", "startTime",
    "completionTime", "nodes", "readyNodes", "lastFailure", "excludedNodes", "stagingSeen",
)

# Messages quote other components (the API server's validation errors, pod messages, log lines)
# and can be any length; the CRD caps a condition message at 32768 characters and the API server
# then refuses the whole status write. Every message is cut to this before it is written: long
# enough for a full validation error or 20 log lines, far under the cap.
MESSAGE_LIMIT = 4096
# Kopf cuts Event messages at 1024 characters without a trace; cut them first, with a marker.
EVENT_MESSAGE_LIMIT = 1000
_CUT = " [... {} characters cut ...] "


def bounded(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` if it fits in `limit` characters, else its head and tail around a marker saying how
    much was cut (the head names what failed, the tail often says why)."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(_CUT.format(len(text))), 0)
    head = keep - keep // 2
    return text[:head] + _CUT.format(len(text) - keep) + text[len(text) - keep // 2:]


def bound_messages(status: Mapping[str, Any]) -> dict[str, Any]:
    """`status` with every free-form text the operator writes bounded: condition messages and
    lastFailure's message and logTail."""
    result = dict(status)
    if result.get("conditions"):
        result["conditions"] = [
            {**c, "message": bounded(c["message"])} if isinstance(c.get("message"), str) else c
            for c in result["conditions"]]
    failure = result.get("lastFailure")
    if failure:
        result["lastFailure"] = {k: bounded(v) if k in ("message", "logTail") and isinstance(v, str) else v
                                 for k, v in failure.items()}
    return result


def ready_nodes(pods: Iterable[PodView], num_nodes: int) -> str:
    ready = sum(1 for pod in pods if pod.phase in (RUNNING, SUCCEEDED) and not pod.deleting)
    return f"{ready}/{num_nodes}"


def node_entries(pods: Iterable[PodView]) -> list[dict[str, Any]]:
    entries = []
    for pod in sorted(pods, key=lambda p: p.rank):
        entry = {
            "rank": pod.rank,
            "pod": pod.name,
            "phase": "Terminating" if pod.deleting and not pod.finished else pod.phase,
            "exitCode": pod.exit_code,
            "reason": pod.reason,
            "nodeName": pod.node_name,
        }
        entries.append({k: v for k, v in entry.items() if v is not None})
    return entries


@dataclasses.dataclass(frozen=True)
class Transition:
    """A phase change: the new phase and the condition that records why."""

    phase: str
    reason: str
    message: str


# Which condition each phase sets True, and which it turns False when entered.
_PHASE_CONDITION = {
    CREATED: ("Created", ("Restarting", "Suspended", "Queued")),
    STAGING: ("Staging", ("Restarting", "Queued")),
    RUNNING_PHASE: ("Running", ("Restarting", "Queued", "Staging")),
    RESTARTING: ("Restarting", ("Running", "Staging")),
    SUCCEEDED_PHASE: ("Succeeded", ("Running", "Restarting", "Staging")),
    FAILED: ("Failed", ("Running", "Restarting", "Queued", "Staging")),
    SUSPENDED: ("Suspended", ("Running", "Restarting", "Queued", "Staging")),
    QUEUED: ("Queued", ("Restarting", "Suspended")),
    PENDING: (None, ()),
}


def active_phase(current: str, stages_inputs: bool, progress: Mapping[str, Any] | None, attempt: int) -> str:
    """Staging or Running, once every pod of `attempt` runs. A job whose model or dataset is a URI
    (the trainer stages it) is Staging until rank 0 reports this attempt's inputs complete in
    status.progress.staging (a report of an earlier attempt does not count); a job that turned
    Running stays Running for the rest of the attempt."""
    if current == RUNNING_PHASE or not stages_inputs:
        return RUNNING_PHASE
    staging = (progress or {}).get("staging") or {}
    if staging.get("attempt") == attempt and staging.get("complete") is True:
        return RUNNING_PHASE
    return STAGING


def set_condition(
    conditions: Sequence[Mapping[str, Any]], type_: str, status: bool, reason: str, message: str,
    now: dt.datetime, generation: int | None,
) -> list[dict[str, Any]]:
    """Return conditions with `type_` set; lastTransitionTime moves only when the status flips."""
    wanted = "True" if status else "False"
    result: list[dict[str, Any]] = []
    found = False
    for condition in conditions:
        condition = dict(condition)
        if condition.get("type") == type_:
            found = True
            if condition.get("status") != wanted:
                condition["lastTransitionTime"] = format_time(now)
            condition.update(status=wanted, reason=reason, message=message)
            if generation is not None:
                condition["observedGeneration"] = generation
        result.append(condition)
    if not found:
        condition = {"type": type_, "status": wanted, "reason": reason, "message": message,
                     "lastTransitionTime": format_time(now)}
        if generation is not None:
            condition["observedGeneration"] = generation
        result.append(condition)
    return result


def condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def set_message(conditions: Sequence[Mapping[str, Any]], type_: str, message: str) -> list[dict[str, Any]]:
    """Conditions with only the message of `type_` replaced (status, reason and time kept)."""
    return [{**c, "message": message} if c.get("type") == type_ else dict(c) for c in conditions]


def apply_transition(
    conditions: Sequence[Mapping[str, Any]], transition: Transition, now: dt.datetime, generation: int | None,
) -> list[dict[str, Any]]:
    true_type, false_types = _PHASE_CONDITION[transition.phase]
    result = [dict(c) for c in conditions]
    for type_ in false_types:
        current = condition(result, type_)
        if current is not None and current.get("status") == "True":
            result = set_condition(result, type_, False, transition.reason, transition.message, now, generation)
    if true_type is not None:
        result = set_condition(result, true_type, True, transition.reason, transition.message, now, generation)
    return result


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The operator-owned keys whose value changed; empty when nothing did (then no write)."""
    return {
        key: value for key, value in desired.items()
        if key in OPERATOR_KEYS and current.get(key) != value
    }
