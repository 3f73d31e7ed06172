"""Decide what one job needs next: observe -> classify -> decide, as pure functions.

`decide` reads an `Observation` (the job, its parsed spec or the reason it does not parse, the
current status, the job's pods, the clock) and returns a `Decision` (objects to create, pods to
delete, one status patch, events, when to look again). It never calls the API, so every
situation is a unit test; `kube.py` gathers the observation and carries the decision out.

The attempt number in status is the spine: every pod is labelled with the attempt that created it,
the status is written (attempt + 1) before any pod of a new attempt exists, and pods of older
attempts must be gone before new ones are created, so two attempts never overlap and an operator
restarted at any point finds the same plan.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from lorakube import builders, failures, nodes, queueing, rbac
from lorakube_api import contract
from lorakube import status as st
from lorakube.pods import FAILED as POD_FAILED
from lorakube.pods import PENDING as POD_PENDING
from lorakube.pods import RUNNING as POD_RUNNING
from lorakube.pods import SUCCEEDED as POD_SUCCEEDED
from lorakube.pods import PodView, format_time, parse_time
from lorakube.spec import InvalidSpec, JobRef, JobSpec

# While waiting for pods to go, look again soon; pod events usually arrive first.
WAIT_FOR_DELETION_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 3600.0
# Gang restarts after disruptions (eviction, preemption, node loss) do not spend maxRestarts, but a
# job whose pods are taken away again and again still ends instead of cycling forever.
MAX_DISRUPTIONS = 20
LOG_TAIL_LINES = 20
# A kubelet confirms a deletion within seconds of the grace period's end (deletionTimestamp); a
# pod still there this much later is stuck (its node is gone, or a finalizer holds it), and the
# restart waiting for it says so.
TERMINATION_MARGIN_SECONDS = 15.0
# While waiting only on stuck pods, look again this often (pod events still wake the job at once).
STUCK_RECHECK_SECONDS = 15.0

# While Kueue holds the gang, look again this often to keep the Queued message current (the pods'
# ungating is an event that wakes the job at once).
QUEUED_RECHECK_SECONDS = 10.0

# While Staging, the operator notes the staging report it last saw change (status.stagingSeen, by
# its own clock: the trainer's clock may differ) at most this often, and a quarter of the job's
# stagingProgressDeadlineSeconds when that is shorter: a status write per report would double the
# API traffic of staging, and a note older by this much only makes the stall rule later, never early.
STAGING_SEEN_REFRESH_SECONDS = 30.0

# Node states kube.observe reports for the nodes of stuck pods.
NODE_READY, NODE_NOT_READY, NODE_MISSING, NODE_UNKNOWN = "Ready", "NotReady", "Missing", "Unknown"


@dataclasses.dataclass(frozen=True)
class Event:
    type: str        # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Observation:
    job: JobRef
    generation: int | None
    spec: JobSpec | None
    spec_error: InvalidSpec | None
    status: Mapping[str, Any]
    pods: Sequence[PodView]
    service_exists: bool
    now: dt.datetime
    deleting: bool = False
    # None: not looked up (no pods were about to be created).
    service_account_exists: bool | None = None
    log_tails: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # The state of each node that holds a stuck pod (see nodes_to_check); empty otherwise.
    node_states: Mapping[str, str] = dataclasses.field(default_factory=dict)
    created_at: dt.datetime | None = None    # the job's metadata.creationTimestamp
    # The Kueue Workload of the current attempt's pod group (see workload_to_read); None when not
    # read or not there (yet).
    workload: queueing.WorkloadView | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    create_service: Mapping[str, Any] | None = None
    # The trainer's ServiceAccount, Role and RoleBinding, created (or adopted) before the pods.
    create_access: tuple[Mapping[str, Any], ...] = ()
    create_pods: tuple[Mapping[str, Any], ...] = ()
    delete_pods: tuple[str, ...] = ()
    # Stuck past their grace period on a node that is NotReady or gone: delete with grace 0.
    force_delete_pods: tuple[str, ...] = ()
    status_patch: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None
    delete_job: bool = False     # ttlSecondsAfterFinished ran out
    # Facts for the operator's metrics, counted once the status patch is written:
    gang_restart: str | None = None                    # this pass restarts the gang, for this reason
    pods_running: tuple[str, float] | None = None      # ("first" | "later", seconds): see time_to_running
    # Kueue Workloads of pod groups whose gated pods are being deleted (see _abandoned_groups).
    delete_workloads: tuple[str, ...] = ()


def current_attempt(status: Mapping[str, Any]) -> int:
    return int(status.get("attempt") or 1)


def pods_needing_log_tail(status: Mapping[str, Any], pods: Sequence[PodView], uid: str,
                          spec: JobSpec | None = None, now: dt.datetime | None = None) -> list[str]:
    """Failed pods of the current attempt whose log tail a failure record may need, and the pod
    the stall rule blames (rank 0) in the pass where it fires, so lastFailure shows where staging
    stood; fetched only while the job is still live, so a finished job costs no log reads."""
    if status.get("phase") in st.TERMINAL_PHASES or status.get("phase") == st.RESTARTING:
        return []
    attempt = current_attempt(status)
    current = [p for p in pods if p.owner_uid == uid and p.attempt == attempt]
    names = [p.name for p in current if p.phase == POD_FAILED]
    if spec is not None and now is not None and current and staging_stall_due(status, spec, now):
        blamed = _stall_blames([p for p in current if p.rank < spec.resources.num_nodes] or current)
        if blamed.name not in names:
            names.append(blamed.name)
    return names


def overdue(pod: PodView, now: dt.datetime) -> bool:
    """Being deleted, and still here well after its grace period ended."""
    return (pod.deleting and pod.deletion_due is not None
            and (now - pod.deletion_due).total_seconds() >= TERMINATION_MARGIN_SECONDS)


def nodes_to_check(status: Mapping[str, Any], pods: Sequence[PodView], uid: str, now: dt.datetime) -> list[str]:
    """Nodes whose state decides whether a stuck pod of this job may be force-deleted; looked up
    only for pods stuck past their grace period, so a normal pass reads no node."""
    if status.get("phase") in st.TERMINAL_PHASES:
        return []
    stuck = {p.node_name for p in pods if p.owner_uid == uid and p.node_name and overdue(p, now)}
    # And the nodes of the current attempt's failed or deleted pods: a failure that restarts the
    # gang may be the node's (nodes.attribute); read only on the passes that see a failure.
    attempt = current_attempt(status)
    failing = set() if status.get("phase") == st.RESTARTING else {
        p.node_name for p in pods if p.owner_uid == uid and p.node_name and p.attempt == attempt
        and (p.phase == POD_FAILED or (p.deleting and p.phase != POD_SUCCEEDED))}
    return sorted(stuck | failing)


def workload_to_read(status: Mapping[str, Any], spec: JobSpec | None, pods: Sequence[PodView],
                     job: JobRef) -> str | None:
    """The Workload whose conditions this pass needs: the current attempt's group while one of
    its pods has not started yet (gated: why it waits; ungated: when it was admitted)."""
    if spec is None or spec.queue is None or status.get("phase") in st.TERMINAL_PHASES:
        return None
    attempt = current_attempt(status)
    if any(p.owner_uid == job.uid and p.attempt == attempt and p.phase == POD_PENDING and not p.deleting
           for p in pods):
        return queueing.group_name(job.name, attempt)
    return None


def _abandoned_groups(job: JobRef, mine: Sequence[PodView]) -> tuple[str, ...]:
    """Groups with a gated pod that is being deleted. Such a pod never ran, so it never reaches a
    terminal phase, and Kueue keeps its finalizer (and the group's Workload) waiting for it;
    deleting the Workload is Kueue's documented way to end the group and release the pods."""
    return tuple(sorted({queueing.group_name(job.name, p.attempt) for p in mine
                         if p.deleting and p.gated and queueing.POD_FINALIZER in p.finalizers}))


def backoff_seconds(base: int, restarts: int) -> float:
    """Exponential: base, 2*base, 4*base ... for the 1st, 2nd, 3rd restart, capped at an hour."""
    if restarts <= 0 or base <= 0:
        return 0.0
    return min(float(base) * 2 ** (restarts - 1), MAX_BACKOFF_SECONDS)


class _Plan:
    """Accumulates one pass's outcome: the desired status, children to create/delete, events."""

    def __init__(self, obs: Observation) -> None:
        self.obs = obs
        self.status: dict[str, Any] = {k: obs.status[k] for k in st.OPERATOR_KEYS if k in obs.status}
        self.status.setdefault("phase", st.PENDING)
        self.status.setdefault("conditions", [])
        self.status.setdefault("attempt", 1)
        self.status.setdefault("restarts", 0)
        self.status.setdefault("disruptions", 0)
        if obs.generation is not None:
            self.status["observedGeneration"] = obs.generation
        self.create_service: Mapping[str, Any] | None = None
        self.create_access: list[Mapping[str, Any]] = []
        self.create_pods: list[Mapping[str, Any]] = []
        self.delete_pods: list[str] = []
        self.force_delete_pods: list[str] = []
        self.events: list[Event] = []
        self.requeue_after: float | None = None
        self.delete_job = False
        self.gang_restart: str | None = None
        self.pods_running: tuple[str, float] | None = None
        self.delete_workloads: tuple[str, ...] = ()

    @property
    def phase(self) -> str:
        return self.status["phase"]

    def transition(self, phase: str, reason: str, message: str, warning: bool = False,
                   event: bool = True) -> None:
        if phase == self.phase and self._condition_reason(phase) == reason:
            return
        self.status["conditions"] = st.apply_transition(
            self.status["conditions"], st.Transition(phase, reason, message), self.obs.now, self.obs.generation)
        self.status["phase"] = phase
        if phase != st.STAGING and self.status.get("stagingSeen"):
            self.status["stagingSeen"] = None     # it serves the Staging phase only
        if phase in st.TERMINAL_PHASES:
            self.status.setdefault("completionTime", format_time(self.obs.now))
            # Exclusions serve the job's next attempts; a finished job has none (the Events stay).
            self.clear_exclusions()
        if event:
            self.events.append(Event("Warning" if warning else "Normal", reason, message))

    def _condition_reason(self, phase: str) -> str | None:
        found = st.condition(self.status["conditions"], phase)
        return found.get("reason") if found and found.get("status") == "True" else None

    def clear_exclusions(self) -> None:
        if self.status.get("excludedNodes"):
            self.status["excludedNodes"] = None   # the merge patch removes the field

    def exclude_nodes(self, current: Sequence[PodView]) -> None:
        """Keep the next attempts off the nodes the current attempt's failure is blamed on; each
        entry records the attempt that failed there."""
        blames = nodes.attribute(current, self.obs.log_tails, self.obs.node_states)
        entries, new = nodes.add_exclusions(self.status.get("excludedNodes") or [], blames,
                                            format_time(self.obs.now), self.status["attempt"])
        if not new:
            return
        self.status["excludedNodes"] = entries
        for blame in new:
            self.events.append(Event("Warning", "NodeExcluded", (
                f"attempts after {self.status['attempt']} avoid node {blame.node} ({blame.reason}): "
                f"{blame.detail}")))

    def record_failure(self, failure: failures.Failure) -> None:
        pod = failure.pod
        record = {
            "pod": pod.name,
            "exitCode": pod.exit_code,
            "reason": failure.rule.reason,
            "message": pod.message or failure.message,
            "logTail": self.obs.log_tails.get(pod.name),
        }
        self.status["lastFailure"] = {k: v for k, v in record.items() if v is not None}

    def delete(self, pods: Sequence[PodView]) -> None:
        self.delete_pods.extend(p.name for p in pods if not p.deleting and p.name not in self.delete_pods)

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    def decision(self) -> Decision:
        return Decision(
            create_service=self.create_service,
            create_access=tuple(self.create_access),
            create_pods=tuple(self.create_pods),
            delete_pods=tuple(self.delete_pods),
            force_delete_pods=tuple(self.force_delete_pods),
            # Bounded here, once for every path: a message the CRD refuses fails the whole write.
            status_patch=st.status_patch(self.obs.status, st.bound_messages(self.status)),
            events=tuple(Event(e.type, e.reason, st.bounded(e.message, st.EVENT_MESSAGE_LIMIT))
                         for e in self.events),
            requeue_after=self.requeue_after,
            delete_job=self.delete_job,
            gang_restart=self.gang_restart,
            pods_running=self.pods_running,
            delete_workloads=self.delete_workloads,
        )


def decide(obs: Observation, config: builders.OperatorConfig) -> Decision:
    mine = [p for p in obs.pods if p.owner_uid == obs.job.uid]
    if obs.deleting:
        # Garbage collection removes the pods and the Service through their owner references
        # (gated pods only once their Kueue group is ended).
        return Decision(delete_workloads=_abandoned_groups(obs.job, mine))
    plan = _Plan(obs)
    if obs.spec_error is not None or obs.spec is None:
        _fail_invalid(plan, mine, str(obs.spec_error))
    else:
        _decide_valid(plan, obs.spec, mine, obs.pods, config)
    plan.delete_workloads = _abandoned_groups(obs.job, mine)
    return plan.decision()


def _fail_invalid(plan: _Plan, mine: Sequence[PodView], message: str) -> None:
    plan.transition(st.FAILED, "InvalidSpec", message, warning=True)
    plan.delete([p for p in mine if p.active])


def _decide_valid(plan: _Plan, spec: JobSpec, mine: list[PodView], all_pods: Sequence[PodView],
                  config: builders.OperatorConfig) -> None:
    obs = plan.obs
    num_nodes = spec.resources.num_nodes
    attempt = plan.status["attempt"]
    current = {p.rank: p for p in mine if p.attempt == attempt and p.rank < num_nodes}
    plan.status["nodes"] = st.node_entries(current.values())
    plan.status["readyNodes"] = st.ready_nodes(current.values(), num_nodes)

    if plan.phase in st.TERMINAL_PHASES:
        # The outcome is decided: free the nodes at once, keep finished pods for their logs.
        plan.delete([p for p in mine if p.active])
        _expire(plan, spec)
        return

    if not spec.run_policy.node_avoidance:
        plan.clear_exclusions()
    if spec.run_policy.suspend:
        if plan.phase != st.SUSPENDED:
            plan.transition(st.SUSPENDED, "Suspended", "spec.runPolicy.suspend is true; pods deleted")
        plan.delete([p for p in mine if not p.deleting])
        return
    if plan.phase == st.SUSPENDED:
        # Resume with a fresh attempt so the suspended attempt's pods count as old and must go first.
        attempt = plan.status["attempt"] = attempt + 1
        plan.status["conditions"] = st.set_condition(
            plan.status["conditions"], "Suspended", False, "Resumed", "spec.runPolicy.suspend is false",
            obs.now, obs.generation)
        plan.status["phase"] = st.PENDING
        # As Kubernetes Jobs do: the activeDeadlineSeconds clock restarts with the resumed pods,
        # so time spent suspended is not charged (None removes it until the pods are created).
        plan.status["startTime"] = None
        plan.events.append(Event("Normal", "Resumed", f"resuming with attempt {attempt}"))
        current = {}

    if _deadline_exceeded(plan, spec, mine):
        return

    old = [p for p in mine if p.attempt < attempt]
    if old:
        plan.delete(old)
        _wait_for_old_pods(plan, old)
        return
    if any(p.attempt > attempt for p in mine):
        # The status we read predates our own last write; the next pass sees the new attempt.
        plan.requeue(WAIT_FOR_DELETION_SECONDS)
        return

    failure = _first_failure(plan, current, num_nodes, failures.rules_for(spec.run_policy.failure_rules))
    if failure is not None:
        _handle_failure(plan, spec, failure, current)
        return

    if plan.phase == st.RESTARTING:
        restarting = st.condition(plan.status["conditions"], "Restarting") or {}
        since = parse_time(restarting.get("lastTransitionTime")) or obs.now
        wait = backoff_seconds(spec.run_policy.backoff_seconds,
                               plan.status["restarts"] + plan.status["disruptions"])
        remaining = (since - obs.now).total_seconds() + wait
        if remaining > 0:
            plan.requeue(remaining)
            return

    missing = [rank for rank in range(num_nodes) if rank not in current]
    if missing:
        _create_missing(plan, spec, missing, all_pods, config)
        return
    if obs.service_exists is False:
        plan.create_service = builders.build_service(obs.job)

    if spec.queue is not None and _queued(plan, spec, current):
        return
    if _startup_deadline_exceeded(plan, spec, current):
        return
    phases = [p.phase for p in current.values()]
    if all(phase == POD_SUCCEEDED for phase in phases):
        plan.transition(st.SUCCEEDED_PHASE, "AllPodsSucceeded", f"all {num_nodes} pods exited 0")
    elif all(phase in (POD_RUNNING, POD_SUCCEEDED) for phase in phases):
        if plan.phase not in st.ACTIVE_PHASES:
            plan.pods_running = time_to_running(obs, attempt, current.values())
        _running_or_staging(plan, spec, num_nodes, attempt)
        stalled = _staging_stalled(plan, spec, current) if plan.phase == st.STAGING else None
        if stalled is not None:
            _handle_failure(plan, spec, stalled, current)


def _running_or_staging(plan: _Plan, spec: JobSpec, num_nodes: int, attempt: int) -> None:
    staged = [uri for uri in (spec.model.uri, spec.dataset.uri, spec.model.pretrained_lora_uri)
              if uri and contract.is_staged_uri(uri)]
    running = f"all {num_nodes} pods of attempt {attempt} are running"
    phase = st.active_phase(plan.phase, bool(staged), plan.obs.status.get("progress"), attempt)
    if plan.phase == st.RUNNING_PHASE:
        return      # whatever brought it there (AllPodsRunning or InputsStaged) stays the reason
    if phase == st.STAGING:
        shown = " and ".join(contract.uri_for_display(uri) for uri in staged)
        plan.transition(st.STAGING, "StagingInputs", f"{running}; rank 0 stages {shown} into its node's cache "
                        "(bytes in status.progress.staging)")
    elif plan.phase == st.STAGING:
        # How long it took, for `kubectl describe`: from the Staging condition's transition.
        began = parse_time((st.condition(plan.status["conditions"], "Staging") or {}).get("lastTransitionTime"))
        took = f" in {(plan.obs.now - began).total_seconds():.0f} s" if began is not None else ""
        plan.transition(st.RUNNING_PHASE, "InputsStaged", f"{running}; rank 0 staged its inputs{took} and trains")
    else:
        plan.transition(st.RUNNING_PHASE, "AllPodsRunning", running)


def _staging_stalled(plan: _Plan, spec: JobSpec, current: Mapping[int, PodView]) -> failures.Failure | None:
    """The stall rule: Staging with no new staging report of this attempt (an input begun, bytes
    arrived, an input done) for spec.runPolicy.stagingProgressDeadlineSeconds fails the attempt.
    Measured by the operator's clock from the later of the Staging condition's transition and
    status.stagingSeen, the note of the last change this operator saw (see
    STAGING_SEEN_REFRESH_SECONDS), so a rank 0 that never reports (its staging hangs before the
    first byte, or it cannot patch the job's status) is caught as well as a download that stops."""
    obs = plan.obs
    limit = spec.run_policy.staging_progress_deadline_seconds
    attempt = plan.status["attempt"]
    report, seen = _staging_reports(obs.status.get("progress"), plan.status.get("stagingSeen"), attempt)
    value = _new_staging_report(report, seen, attempt)
    if value is not None:
        # Progress since the note: note it now, unless the note is younger than the refresh
        # period (then look again when it is due, so a stall right after is still measured).
        seen_at = parse_time(seen.get("at"))
        refresh = min(STAGING_SEEN_REFRESH_SECONDS, limit / 4)
        age = None if seen_at is None else (obs.now - seen_at).total_seconds()
        if age is None or age >= refresh:
            plan.status["stagingSeen"] = {**value, "at": format_time(obs.now)}
            plan.requeue(limit)
        else:
            plan.requeue(refresh - age)
        return None
    left = _stall_left(plan.status, seen, limit, obs.now)
    if left > 0:
        plan.requeue(left)
        return None
    rank0 = _stall_blames(list(current.values()))
    field = f"spec.runPolicy.stagingProgressDeadlineSeconds is {limit}"
    if report:
        total = report.get("bytesTotal")
        size = f"{report.get('bytesDone')} of {total if total is not None else 'an unknown number of'} bytes"
        explain = (f"staged nothing new for {limit}s ({field}): {report.get('input')} {report.get('uri')} "
                   f"stuck at {size}")
    else:
        explain = (f"sent no staging report in {limit}s of Staging ({field}): its staging hangs before the "
                   f"first input begins, or it cannot patch the job's status.progress (see its log)")
    return failures.staging_stalled(rank0, explain)


def staging_stall_due(status: Mapping[str, Any], spec: JobSpec, now: dt.datetime) -> bool:
    """Whether the stall rule fails the current attempt in a pass at `now` (what decide would
    find), so `observe` reads rank 0's log tail for the failure record in that pass only."""
    if status.get("phase") != st.STAGING:
        return False
    attempt = current_attempt(status)
    report, seen = _staging_reports(status.get("progress"), status.get("stagingSeen"), attempt)
    if _new_staging_report(report, seen, attempt) is not None:
        return False
    return _stall_left(status, seen, spec.run_policy.staging_progress_deadline_seconds, now) <= 0


def _staging_reports(progress: Mapping[str, Any] | None, seen: Mapping[str, Any] | None,
                     attempt: int) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """This attempt's staging report (status.progress.staging) and the operator's note of the last
    one it saw (status.stagingSeen); empty when they belong to an earlier attempt or are absent."""
    report = (progress or {}).get("staging") or {}
    seen = seen or {}
    return (report if report.get("attempt") == attempt else {}), (seen if seen.get("attempt") == attempt else {})


def _new_staging_report(report: Mapping[str, Any], seen: Mapping[str, Any], attempt: int) -> dict[str, Any] | None:
    """The note a report the operator has not noted yet calls for; None when there is nothing new."""
    if not report:
        return None
    value = {"attempt": attempt, "input": report.get("input"), "bytesDone": report.get("bytesDone")}
    return value if {k: seen.get(k) for k in value} != value else None


def _stall_left(status: Mapping[str, Any], seen: Mapping[str, Any], limit: int, now: dt.datetime) -> float:
    """Seconds until the stall deadline, from the later of the note and the Staging transition."""
    staging = st.condition(status.get("conditions") or [], "Staging") or {}
    since = [t for t in (parse_time(seen.get("at")), parse_time(staging.get("lastTransitionTime"))) if t is not None]
    return (max(since) - now).total_seconds() + limit if since else limit


def _stall_blames(current: Sequence[PodView]) -> PodView:
    """Rank 0 (the one that stages), or the lowest rank there is."""
    return min(current, key=lambda p: p.rank)


def time_to_running(obs: Observation, attempt: int, pods: Sequence[PodView]) -> tuple[str, float] | None:
    """How long the attempt took until all its pods ran: the first attempt from the job's creation
    (what a user waits for), a later one from its first pod's creation (the job itself may be
    hours old by then). Seen when the phase turns Running, so once per attempt; an attempt whose
    pods all finished before any pass saw them all running is not measured."""
    if attempt == 1 and obs.created_at is not None:
        return "first", (obs.now - obs.created_at).total_seconds()
    created = [p.created_at for p in pods if p.created_at is not None]
    if not created:
        return None
    return ("first" if attempt == 1 else "later"), (obs.now - min(created)).total_seconds()


def _wait_for_old_pods(plan: _Plan, old: Sequence[PodView]) -> None:
    """The next attempt starts only once the old pods are gone. A pod stuck past its grace period
    on a node that is NotReady or missing (no kubelet will ever confirm) is force-deleted, as
    Kubernetes' own pod garbage collector does for lost nodes; any stuck pod is named, with why,
    in the condition of the phase, so a restart never waits silently."""
    obs = plan.obs
    stuck = [p for p in sorted(old, key=lambda p: p.name) if overdue(p, obs.now)]
    if len(stuck) < len(old):
        # Deletions just asked for or within their grace period: they usually finish in seconds.
        plan.requeue(WAIT_FOR_DELETION_SECONDS)
    else:
        plan.requeue(STUCK_RECHECK_SECONDS)
    if not stuck:
        return
    details = []
    for pod in stuck:
        node = obs.node_states.get(pod.node_name, NODE_UNKNOWN) if pod.node_name else None
        lost = node in (NODE_NOT_READY, NODE_MISSING)
        if lost and pod.deletion_grace_seconds != 0:
            plan.force_delete_pods.append(pod.name)
            plan.events.append(Event("Warning", "ForceDeleted", (
                f"force-deleting pod {pod.name} of attempt {pod.attempt}: its deletion was due at "
                f"{format_time(pod.deletion_due)} and its node {pod.node_name} is {node}")))
            plan.requeue(WAIT_FOR_DELETION_SECONDS)
        parts = [f"deletion due {format_time(pod.deletion_due)}, grace {pod.deletion_grace_seconds}s"]
        if pod.finalizers:
            parts.append(f"finalizers {', '.join(pod.finalizers)}")
        if pod.node_name:
            parts.append(f"node {pod.node_name} {node}" + (", force-deleted" if lost else ""))
        details.append(f"{pod.name} ({'; '.join(parts)})")
    message = (f"attempt {plan.status['attempt']} waits for pods of an earlier attempt to go: "
               + ", ".join(details))
    type_ = "Restarting" if plan.phase == st.RESTARTING else "Suspended"
    found = st.condition(plan.status["conditions"], type_)
    if found is not None and found.get("message") != st.bounded(message):
        plan.status["conditions"] = st.set_message(plan.status["conditions"], type_, message)
        plan.events.append(Event("Warning", "WaitingForPods", message))


def _first_failure(plan: _Plan, current: Mapping[int, PodView], num_nodes: int,
                   rules: Sequence[failures.Rule]) -> failures.Failure | None:
    """The failure that decides this pass: a user error anywhere beats a retryable one, then the
    lowest rank, so the record names the same pod however the events arrive."""
    found: list[failures.Failure] = []
    for pod in sorted(current.values(), key=lambda p: p.rank):
        if pod.phase == POD_FAILED:
            found.append(failures.classify(pod, rules))
        elif pod.deleting and pod.phase != POD_SUCCEEDED:
            found.append(failures.deleted_by_someone_else(pod))
    if plan.phase in st.ACTIVE_PHASES:
        # Every rank was running once; one that vanished cannot be recreated alone.
        found += [failures.missing(contract.pod_name(plan.obs.job.name, rank), rank, plan.status["attempt"])
                  for rank in range(num_nodes) if rank not in current]
    fatal = [f for f in found if f.rule.action is failures.Action.FAIL]
    return (fatal or found or [None])[0]


def _handle_failure(plan: _Plan, spec: JobSpec, failure: failures.Failure,
                    current: Mapping[int, PodView]) -> None:
    plan.record_failure(failure)
    live = [p for p in current.values() if not p.deleting]
    if failure.rule.action is failures.Action.FAIL:
        plan.transition(st.FAILED, failure.rule.reason, failure.message, warning=True)
        plan.delete([p for p in live if p.active])
        return
    charged = failure.rule.spends_budget
    counter = "restarts" if charged else "disruptions"
    count = plan.status[counter]
    limit = spec.run_policy.max_restarts if charged else MAX_DISRUPTIONS
    if count >= limit:
        reason, bound = (("MaxRestartsExceeded", f"spec.runPolicy.maxRestarts is {limit}") if charged else
                         ("MaxDisruptionsExceeded", f"at most {limit} after evictions, preemptions and node losses"))
        plan.transition(st.FAILED, reason,
                        f"{failure.message}; the job already restarted {count} time(s) ({bound})", warning=True)
        plan.delete([p for p in live if p.active])
        return
    if spec.run_policy.node_avoidance:
        plan.exclude_nodes(list(current.values()))
    plan.status["attempt"] += 1
    plan.status[counter] = count + 1
    plan.gang_restart = failure.rule.reason
    plan.transition(st.RESTARTING, failure.rule.reason,
                    f"{failure.message}; restarting all pods as attempt {plan.status['attempt']}", warning=True)
    # The whole gang goes, finished pods too: the next attempt reuses their names.
    plan.delete(live)
    plan.requeue(WAIT_FOR_DELETION_SECONDS)


def _create_missing(plan: _Plan, spec: JobSpec, missing: Sequence[int], all_pods: Sequence[PodView],
                    config: builders.OperatorConfig) -> None:
    obs = plan.obs
    if spec.resources.service_account_name and obs.service_account_exists is False:
        _fail_invalid(plan, [], f"spec.resources.serviceAccountName: ServiceAccount "
                                f"{spec.resources.service_account_name!r} not found in namespace "
                                f"{obs.job.namespace!r}; create it, or leave the field unset to run "
                                f"as the job's own account")
        return
    names = {contract.pod_name(obs.job.name, rank): rank for rank in missing}
    blockers = [p for p in all_pods if p.name in names and p.owner_uid != obs.job.uid]
    if blockers:
        # Pods of an earlier job with the same name are still being collected.
        plan.requeue(WAIT_FOR_DELETION_SECONDS)
        return
    if not obs.service_exists:
        plan.create_service = builders.build_service(obs.job)
    # Every time pods are created, not only the first: a 409 adopts what an earlier pass made,
    # and an object someone deleted comes back before the pods that need it.
    plan.create_access = rbac.build_trainer_access(spec, obs.job)
    attempt = plan.status["attempt"]
    avoid = nodes.excluded(plan.status.get("excludedNodes") or []) if spec.run_policy.node_avoidance else []
    plan.create_pods = [builders.build_pod(spec, obs.job, attempt, rank, config, avoid) for rank in missing]
    if spec.queue is not None:
        # The clocks (startTime, startupDeadlineSeconds) start at admission, not while queued.
        if plan.phase in (st.PENDING, st.RESTARTING):
            group = queueing.group_name(obs.job.name, attempt)
            plan.transition(st.QUEUED, "Submitted", f"created the pods of attempt {attempt}; waiting for "
                            f"Kueue to admit them as one gang (LocalQueue {spec.queue.queue_name!r}, "
                            f"workload {group})", event=False)
        plan.requeue(QUEUED_RECHECK_SECONDS)
        return
    if not plan.status.get("startTime"):
        plan.status["startTime"] = format_time(obs.now)
    if plan.phase in (st.PENDING, st.RESTARTING):
        # The event names the pods really created (kube.act knows which were already there).
        plan.transition(st.CREATED, "PodsCreated", f"created the pods of attempt {attempt}", event=False)
    plan.requeue(spec.run_policy.startup_deadline_seconds)


def _expire(plan: _Plan, spec: JobSpec) -> None:
    ttl = spec.run_policy.ttl_seconds_after_finished
    finished = parse_time(plan.status.get("completionTime"))
    if ttl is None or finished is None:
        return
    left = (finished - plan.obs.now).total_seconds() + ttl
    if left > 0:
        plan.requeue(left)
    else:
        plan.delete_job = True
        plan.events.append(Event("Normal", "Expired", f"deleting the job {ttl}s after it finished "
                                                      "(spec.runPolicy.ttlSecondsAfterFinished)"))


def rejected(obs: Observation, what: str, message: str) -> Decision:
    """The API server refused a child the spec asked for (admission, Pod Security, an invalid
    user volume): the job cannot run as written, so it fails with the server's words."""
    plan = _Plan(obs)
    plan.transition(st.FAILED, "InvalidSpec", f"the API server rejected {what}: {message}", warning=True)
    return plan.decision()


def status_refused(obs: Observation, message: str) -> Decision:
    """The API server refused the status a pass computed. Writing it again would be refused again
    on every pass, so the job fails with the server's words (bounded) instead of looping."""
    plan = _Plan(obs)
    plan.transition(st.FAILED, "StatusRejected",
                    f"the API server refused the operator's status update: {message}", warning=True)
    return plan.decision()


def _deadline_exceeded(plan: _Plan, spec: JobSpec, mine: Sequence[PodView]) -> bool:
    limit = spec.run_policy.active_deadline_seconds
    started = parse_time(plan.status.get("startTime"))
    if limit is None or started is None:
        return False
    left = (started - plan.obs.now).total_seconds() + limit
    if left > 0:
        plan.requeue(left)
        return False
    plan.transition(st.FAILED, "DeadlineExceeded",
                    f"the job ran longer than spec.runPolicy.activeDeadlineSeconds ({limit}s)", warning=True)
    plan.delete([p for p in mine if p.active])
    return True


def _queued(plan: _Plan, spec: JobSpec, current: Mapping[int, PodView]) -> bool:
    """While Kueue gates any pod of the gang, the job is Queued with Kueue's reason (nothing runs,
    no deadline counts); once every gate is lifted, the gang was admitted whole and the job moves
    on to Created. True while queued."""
    obs = plan.obs
    attempt = plan.status["attempt"]
    group = queueing.group_name(obs.job.name, attempt)
    if any(p.gated for p in current.values()):
        reason, message = queueing.waiting_reason(spec.queue, group, obs.workload)
        if plan.phase == st.QUEUED and plan._condition_reason(st.QUEUED) == reason:
            found = st.condition(plan.status["conditions"], "Queued")
            if found is not None and found.get("message") != st.bounded(message):
                plan.status["conditions"] = st.set_message(plan.status["conditions"], "Queued", message)
        else:
            plan.transition(st.QUEUED, reason, message)
        plan.requeue(QUEUED_RECHECK_SECONDS)
        return True
    if plan.phase == st.QUEUED and not any(queueing.POD_FINALIZER in p.finalizers for p in current.values()):
        # Kueue's webhook marks every pod it manages; none is marked, so nothing queued them.
        plan.transition(st.CREATED, "NotManagedByKueue", (
            f"the pods of attempt {attempt} run without Kueue: its webhook did not take them (is Kueue's "
            f"pod integration on, and does its managedJobsNamespaceSelector select namespace "
            f"{obs.job.namespace!r}?)"), warning=True)
    elif plan.phase == st.QUEUED:
        plan.transition(st.CREATED, "Admitted", f"Kueue admitted attempt {attempt} as one gang "
                        f"(LocalQueue {spec.queue.queue_name!r}, workload {group})")
    if not plan.status.get("startTime"):
        plan.status["startTime"] = format_time(obs.now)
    return False


def _startup_deadline_exceeded(plan: _Plan, spec: JobSpec, current: Mapping[int, PodView]) -> bool:
    """A pod stuck Pending (unschedulable, image pull errors) past startupDeadlineSeconds fails
    the job instead of stalling it silently. Under Kueue the clock starts at admission: time spent
    in the queue is not a startup problem."""
    limit = spec.run_policy.startup_deadline_seconds
    now = plan.obs.now
    admitted = plan.obs.workload.admitted_at if plan.obs.workload is not None else None
    for pod in sorted(current.values(), key=lambda p: p.rank):
        if pod.phase != POD_PENDING or pod.created_at is None or pod.gated:
            continue
        since = max(pod.created_at, admitted) if admitted is not None else pod.created_at
        left = (since - now).total_seconds() + limit
        if left > 0:
            plan.requeue(left)
            continue
        why = f" ({pod.reason})" if pod.reason else ""
        message = (f"pod {pod.name} stayed Pending{why} longer than "
                   f"spec.runPolicy.startupDeadlineSeconds ({limit}s)")
        plan.status["lastFailure"] = {k: v for k, v in {
            "pod": pod.name, "reason": "StartupDeadlineExceeded", "message": pod.message or message}.items() if v}
        plan.transition(st.FAILED, "StartupDeadlineExceeded", message, warning=True)
        plan.delete([p for p in current.values() if p.active])
        return True
    return False
