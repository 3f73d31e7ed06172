"""Kueue admission as the operator sees it: the pods it builds, and decide() while Kueue holds,
admits, preempts or releases the gang. The API is never called (tests/e2e/test_kueue_e2e.py runs
the same against a real Kueue)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from ltj_fixtures import NOW, UID, pod_view

from lorakube import builders, queueing, reconcile
from lorakube_api import contract
from lorakube import pods as pods_module
from lorakube.reconcile import QUEUED_RECHECK_SECONDS, Observation, decide
from lorakube.spec import InvalidSpec, JobRef, parse_job

JOB = JobRef(name="cats", namespace="team-a", uid=UID)
CONFIG = builders.OperatorConfig(trainer_image="example/trainer:1")
LABELS = {queueing.QUEUE_NAME_LABEL: "team-queue"}
FINALIZER = (queueing.POD_FINALIZER,)


def observe(job_spec: dict[str, Any], status: dict[str, Any] | None = None, pods=(), *,
            labels: dict[str, str] | None = None, **extra: Any) -> Observation:
    try:
        parsed, error = parse_job(JOB.name, job_spec, LABELS if labels is None else labels), None
    except InvalidSpec as exc:
        parsed, error = None, exc
    extra.setdefault("service_account_exists", True)
    return Observation(job=JOB, generation=1, spec=parsed, spec_error=error, status=status or {},
                       pods=tuple(pods), service_exists=True, now=NOW, **extra)


def condition(patch: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in patch["conditions"] if c["type"] == type_)


def queued_status(attempt: int = 1, reason: str = "Submitted", **fields: Any) -> dict[str, Any]:
    return {"phase": "Queued", "attempt": attempt, "restarts": 0, "disruptions": 0,
            "conditions": [{"type": "Queued", "status": "True", "reason": reason, "message": "",
                            "lastTransitionTime": "2026-05-01T11:00:00Z"}], **fields}


def gated(rank: int, attempt: int = 1, **fields: Any):
    fields.setdefault("created_at", NOW - dt.timedelta(hours=2))
    return pod_view(rank, "Pending", attempt=attempt, gated=True, finalizers=FINALIZER, **fields)


PENDING_WORKLOAD = queueing.WorkloadView(
    name="cats-1", reason="Pending",
    message="couldn't assign flavors to pod set a1b2: insufficient unused quota for cpu in flavor "
            "default-flavor, 1500m more needed")


# --- pods ---------------------------------------------------------------------------------------


def test_pods_of_a_queued_job_form_one_kueue_group_per_attempt(job_spec):
    labels = {**LABELS, queueing.PRIORITY_CLASS_LABEL: "high"}
    spec = parse_job("cats", job_spec, labels)
    pods = [builders.build_pod(spec, JOB, 2, rank, CONFIG) for rank in range(3)]
    for pod in pods:
        meta = pod["metadata"]
        assert meta["labels"][queueing.QUEUE_NAME_LABEL] == "team-queue"
        assert meta["labels"][queueing.POD_GROUP_NAME_LABEL] == "cats-2"
        assert meta["labels"][queueing.PRIORITY_CLASS_LABEL] == "high"
        # The whole gang is one group of 3; Kueue never waits for single-pod replacements.
        assert meta["annotations"] == {queueing.POD_GROUP_TOTAL_COUNT_ANNOTATION: "3",
                                       queueing.RETRIABLE_IN_GROUP_ANNOTATION: "false"}


def test_pods_of_a_job_without_the_queue_label_carry_no_kueue_metadata(job_spec):
    pod = builders.build_pod(parse_job("cats", job_spec, {"team": "a"}), JOB, 1, 0, CONFIG)
    assert not any(key.startswith("kueue.x-k8s.io/") for key in pod["metadata"]["labels"])
    assert "annotations" not in pod["metadata"]


def test_gang_scheduling_kueue_without_the_queue_label_names_the_label(job_spec):
    job_spec["runPolicy"]["gangScheduling"] = "kueue"
    with pytest.raises(InvalidSpec) as caught:
        parse_job("cats", job_spec, {})
    assert caught.value.field == "metadata.labels"
    assert queueing.QUEUE_NAME_LABEL in str(caught.value) and "LocalQueue" in str(caught.value)
    assert parse_job("cats", job_spec, LABELS).queue == queueing.QueueSpec("team-queue")


def test_group_names_are_unique_per_job_and_attempt():
    names = {queueing.group_name(job, attempt) for job in ("a", "a-1", "a-12") for attempt in (1, 2, 12)}
    assert len(names) == 9
    assert len(queueing.group_name("x" * 54, 10**7)) <= 63


def test_a_pod_view_knows_kueues_gate_and_its_termination_target():
    body = {
        "metadata": {"name": "cats-node-0", "labels": {contract.LABEL_RANK: "0", contract.LABEL_ATTEMPT: "1"},
                     "finalizers": [queueing.POD_FINALIZER]},
        "spec": {"schedulingGates": [{"name": queueing.ADMISSION_GATE}]},
        "status": {"phase": "Pending"},
    }
    view = pods_module.from_body(body)
    assert view.gated and not view.disrupted and view.finalizers == FINALIZER
    body["spec"] = {}
    body["status"] = {"phase": "Running", "conditions": [
        {"type": "TerminationTarget", "status": "True", "reason": "Preempted"}]}
    view = pods_module.from_body(body)
    assert view.disrupted and not view.gated


# --- Workload ------------------------------------------------------------------------------------


def test_a_pending_workload_gives_kueues_reason_and_message():
    body = {"metadata": {"name": "cats-1"}, "status": {"conditions": [
        {"type": "QuotaReserved", "status": "False", "reason": "Pending",
         "message": "couldn't assign flavors: insufficient unused quota for cpu", "lastTransitionTime": "x"}]}}
    view = queueing.workload_from_body(body)
    assert not view.quota_reserved and not view.admitted
    reason, message = queueing.waiting_reason(queueing.QueueSpec("team-queue"), "cats-1", view)
    assert reason == "Pending"
    assert "LocalQueue 'team-queue'" in message and "insufficient unused quota for cpu" in message


def test_an_evicted_workload_reports_the_eviction():
    body = {"metadata": {"name": "cats-1"}, "status": {"conditions": [
        {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": "waiting"},
        {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate a workload"}]}}
    reason, message = queueing.waiting_reason(queueing.QueueSpec("q"), "cats-1", queueing.workload_from_body(body))
    assert reason == "Preempted" and "accommodate" in message


def test_an_admitted_workload_has_its_admission_time():
    body = {"metadata": {"name": "cats-1"}, "status": {"conditions": [
        {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved"},
        {"type": "Admitted", "status": "True", "reason": "Admitted", "lastTransitionTime": "2026-05-01T11:59:00Z"}]}}
    view = queueing.workload_from_body(body)
    assert view.admitted and view.admitted_at == NOW - dt.timedelta(minutes=1)


# --- decide ---------------------------------------------------------------------------------------


def test_a_queued_job_creates_its_pods_and_says_queued_without_starting_the_clock(job_spec):
    decision = decide(observe(job_spec), CONFIG)
    assert len(decision.create_pods) == 3
    patch = decision.status_patch
    assert patch["phase"] == "Queued"
    assert condition(patch, "Queued")["reason"] == "Submitted"
    assert "startTime" not in patch
    assert decision.requeue_after == QUEUED_RECHECK_SECONDS


def test_gated_pods_keep_the_job_queued_with_kueues_reason_past_the_startup_deadline(job_spec):
    job_spec["runPolicy"]["startupDeadlineSeconds"] = 60
    pods = [gated(rank) for rank in range(3)]          # created two hours ago
    decision = decide(observe(job_spec, queued_status(), pods, workload=PENDING_WORKLOAD), CONFIG)
    patch = decision.status_patch
    assert "phase" not in patch        # still Queued
    queued = condition(patch, "Queued")
    assert queued["reason"] == "Pending" and "1500m more needed" in queued["message"]
    assert "Failed" not in [c["type"] for c in patch["conditions"]]
    assert decision.delete_pods == () and decision.create_pods == ()
    assert decision.requeue_after == QUEUED_RECHECK_SECONDS


def test_a_new_kueue_message_updates_the_condition_without_an_event(job_spec):
    pods = [gated(rank) for rank in range(3)]
    status = queued_status(reason="Pending")
    decision = decide(observe(job_spec, status, pods, workload=PENDING_WORKLOAD), CONFIG)
    assert "1500m more needed" in condition(decision.status_patch, "Queued")["message"]
    assert decision.events == ()


def test_before_kueue_made_the_workload_the_job_waits_for_it(job_spec):
    pods = [gated(rank) for rank in range(3)]
    patch = decide(observe(job_spec, queued_status(), pods), CONFIG).status_patch
    assert condition(patch, "Queued")["reason"] == "WaitingForWorkload"


def test_admission_lifts_every_gate_and_the_job_moves_on_with_its_clocks_started(job_spec):
    admitted = queueing.WorkloadView(name="cats-1", quota_reserved=True, admitted=True,
                                     admitted_at=NOW - dt.timedelta(seconds=5))
    pods = [pod_view(r, "Pending", finalizers=FINALIZER, created_at=NOW - dt.timedelta(hours=2))
            for r in range(3)]
    decision = decide(observe(job_spec, queued_status(), pods, workload=admitted), CONFIG)
    patch = decision.status_patch
    assert patch["phase"] == "Created"
    assert condition(patch, "Created")["reason"] == "Admitted"
    assert condition(patch, "Queued")["status"] == "False"
    assert patch["startTime"] == "2026-05-01T12:00:00Z"
    # The pods were created two hours ago, but the startup deadline counts from admission.
    assert "Failed" not in [c["type"] for c in patch["conditions"]]


def test_the_startup_deadline_still_holds_after_admission(job_spec):
    job_spec["runPolicy"]["startupDeadlineSeconds"] = 60
    admitted = queueing.WorkloadView(name="cats-1", quota_reserved=True, admitted=True,
                                     admitted_at=NOW - dt.timedelta(seconds=61))
    pods = [pod_view(r, "Pending", finalizers=FINALIZER, created_at=NOW - dt.timedelta(hours=2))
            for r in range(3)]
    status = {"phase": "Created", "attempt": 1, "startTime": "2026-05-01T11:58:59Z"}
    patch = decide(observe(job_spec, status, pods, workload=admitted), CONFIG).status_patch
    assert condition(patch, "Failed")["reason"] == "StartupDeadlineExceeded"


def test_pods_kueue_did_not_take_are_reported(job_spec):
    pods = [pod_view(r, "Pending") for r in range(3)]       # no gate, no Kueue finalizer
    decision = decide(observe(job_spec, queued_status(), pods), CONFIG)
    created = condition(decision.status_patch, "Created")
    assert created["reason"] == "NotManagedByKueue" and "managedJobsNamespaceSelector" in created["message"]
    assert [e.type for e in decision.events] == ["Warning"]


def test_kueue_preempting_the_gang_is_a_disruption_and_the_next_attempt_queues_again(job_spec):
    status = {"phase": "Running", "attempt": 1, "restarts": 0, "disruptions": 0,
              "startTime": "2026-05-01T11:50:00Z", "conditions": []}
    # Kueue marks every pod of the group TerminationTarget and deletes it.
    pods = [pod_view(r, "Running", deleting=True, disrupted=True, finalizers=FINALIZER) for r in range(3)]
    decision = decide(observe(job_spec, status, pods), CONFIG)
    patch = decision.status_patch
    assert patch["phase"] == "Restarting"
    assert condition(patch, "Restarting")["reason"] == "PodDisrupted"
    assert patch["attempt"] == 2 and patch["disruptions"] == 1 and "restarts" not in patch

    # Once the old pods are gone and the backoff passed, attempt 2 is a new group, queued again.
    restarting = {**status, **patch}
    later = dt.timedelta(seconds=job_spec["runPolicy"]["backoffSeconds"] + 1)
    obs = observe(job_spec, restarting, ())
    decision = decide(dataclass_replace(obs, now=NOW + later), CONFIG)
    assert decision.status_patch["phase"] == "Queued"
    assert {p["metadata"]["labels"][queueing.POD_GROUP_NAME_LABEL] for p in decision.create_pods} == {"cats-2"}


def test_gated_pods_being_deleted_end_their_group_by_deleting_its_workload(job_spec):
    # Suspended while queued: the gated pods never ran, so only deleting the Workload lets Kueue
    # drop its finalizer; pods of a group that ran end by themselves.
    job_spec["runPolicy"]["suspend"] = True
    pods = [gated(r, deleting=True) for r in range(3)]
    decision = decide(observe(job_spec, queued_status(), pods), CONFIG)
    assert decision.delete_workloads == ("cats-1",)
    ran = [pod_view(r, "Failed", deleting=True, finalizers=FINALIZER, attempt=2) for r in range(3)]
    assert decide(observe(job_spec, queued_status(attempt=2), ran), CONFIG).delete_workloads == ()
    # The job itself deleted while queued: its garbage-collected pods need the same.
    deleted = dataclass_replace(observe(job_spec, queued_status(), pods), deleting=True)
    assert decide(deleted, CONFIG).delete_workloads == ("cats-1",)


def test_the_workload_is_read_only_while_a_pod_of_the_current_attempt_waits(job_spec):
    spec = parse_job("cats", job_spec, LABELS)
    assert reconcile.workload_to_read({"attempt": 2}, spec, [gated(0, attempt=2)], JOB) == "cats-2"
    assert reconcile.workload_to_read({"attempt": 2}, spec, [pod_view(0, "Running", attempt=2)], JOB) is None
    assert reconcile.workload_to_read({"attempt": 2}, parse_job("cats", job_spec), [gated(0, attempt=2)], JOB) is None
    assert reconcile.workload_to_read({"phase": "Failed"}, spec, [gated(0)], JOB) is None


def dataclass_replace(obs: Observation, **changes: Any) -> Observation:
    return dataclasses.replace(obs, **changes)
