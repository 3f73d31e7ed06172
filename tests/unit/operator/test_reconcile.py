"""decide() for each situation a job can be in; the API is never called."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from ltj_fixtures import NOW, UID, pod_view

from lorakube import builders, reconcile
from lorakube_api import contract
from lorakube import status as st
from lorakube.reconcile import MAX_DISRUPTIONS, Observation, backoff_seconds, decide, pods_needing_log_tail
from lorakube.spec import InvalidSpec, JobRef, parse_job

JOB = JobRef(name="cats", namespace="team-a", uid=UID)
CONFIG = builders.OperatorConfig(trainer_image="example/trainer:1")


def observe(job_spec: dict[str, Any], status: dict[str, Any] | None = None, pods=(), *,
            service_exists: bool = True, now: dt.datetime = NOW, **extra: Any) -> Observation:
    try:
        parsed, error = parse_job(JOB.name, job_spec), None
    except InvalidSpec as exc:
        parsed, error = None, exc
    return Observation(job=JOB, generation=1, spec=parsed, spec_error=error, status=status or {},
                       pods=tuple(pods), service_exists=service_exists, now=now, **extra)


def condition(patch: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in patch["conditions"] if c["type"] == type_)


def created_names(decision) -> list[str]:
    return [m["metadata"]["name"] for m in decision.create_pods]


def running_status(**fields: Any) -> dict[str, Any]:
    return {"phase": "Running", "attempt": 1, "restarts": 0, "startTime": "2026-05-01T11:59:00Z",
            "conditions": [{"type": "Running", "status": "True", "reason": "AllPodsRunning", "message": "",
                            "lastTransitionTime": "2026-05-01T11:59:30Z"}], **fields}


def test_new_job_creates_the_service_and_every_pod(job_spec):
    decision = decide(observe(job_spec, service_exists=False, service_account_exists=True), CONFIG)
    assert decision.create_service["metadata"]["name"] == "cats"
    assert created_names(decision) == ["cats-node-0", "cats-node-1", "cats-node-2"]
    assert all(m["metadata"]["labels"][contract.LABEL_ATTEMPT] == "1" for m in decision.create_pods)
    patch = decision.status_patch
    assert patch["phase"] == "Created" and patch["attempt"] == 1 and patch["restarts"] == 0
    assert patch["startTime"] == "2026-05-01T12:00:00Z"
    assert patch["observedGeneration"] == 1
    assert condition(patch, "Created")["status"] == "True"


def test_only_the_missing_pods_are_created(job_spec):
    status = {"phase": "Created", "attempt": 1, "restarts": 0}
    pods = [pod_view(0, "Pending"), pod_view(2, "Running")]
    decision = decide(observe(job_spec, status, pods, service_account_exists=True), CONFIG)
    assert created_names(decision) == ["cats-node-1"]
    assert decision.create_service is None
    assert decision.delete_pods == ()


def test_all_pods_running_moves_the_job_to_running(job_spec):
    status = {"phase": "Created", "attempt": 1, "restarts": 0}
    pods = [pod_view(r, "Running", node_name="localnode-0") for r in range(3)]
    decision = decide(observe(job_spec, status, pods), CONFIG)
    patch = decision.status_patch
    assert patch["phase"] == "Running"
    assert condition(patch, "Running")["status"] == "True"
    assert patch["readyNodes"] == "3/3"
    assert patch["nodes"][1] == {"rank": 1, "pod": "cats-node-1", "phase": "Running", "nodeName": "localnode-0"}
    assert decision.create_pods == () and decision.delete_pods == ()


def test_a_running_job_that_is_unchanged_writes_nothing(job_spec):
    pods = [pod_view(r, "Running") for r in range(3)]
    first = decide(observe(job_spec, running_status(), pods), CONFIG)
    settled = {**running_status(), **first.status_patch}
    again = decide(observe(job_spec, settled, pods), CONFIG)
    assert again.status_patch == {} and again.events == ()


def test_exit_1_fails_the_job_at_once_with_the_failure_record(job_spec):
    pods = [pod_view(0, "Running"), pod_view(1, "Failed", exit_code=1, reason="Error",
                                               message="ValueError: bad caption"), pod_view(2, "Running")]
    obs = observe(job_spec, running_status(), pods, log_tails={"cats-node-1": "Traceback...\nValueError"})
    decision = decide(obs, CONFIG)
    patch = decision.status_patch
    assert patch["phase"] == "Failed"
    assert condition(patch, "Failed")["reason"] == "UserError"
    assert condition(patch, "Running")["status"] == "False"
    assert patch["lastFailure"] == {"pod": "cats-node-1", "exitCode": 1, "reason": "UserError",
                                    "message": "ValueError: bad caption", "logTail": "Traceback...\nValueError"}
    assert patch["completionTime"] == "2026-05-01T12:00:00Z"
    # the other ranks are stopped at once so their nodes are free; the failed pod stays for its logs
    assert sorted(decision.delete_pods) == ["cats-node-0", "cats-node-2"]
    assert [e.type for e in decision.events] == ["Warning"]


def test_exit_75_restarts_the_whole_gang_as_the_next_attempt(job_spec):
    pods = [pod_view(0, "Running"), pod_view(1, "Failed", exit_code=contract.EXIT_RETRYABLE), pod_view(2, "Running")]
    decision = decide(observe(job_spec, running_status(), pods), CONFIG)
    patch = decision.status_patch
    assert patch["phase"] == "Restarting"
    assert patch["attempt"] == 2 and patch["restarts"] == 1
    assert condition(patch, "Restarting")["reason"] == "RetryableExit"
    assert "attempt 2" in condition(patch, "Restarting")["message"]
    assert sorted(decision.delete_pods) == ["cats-node-0", "cats-node-1", "cats-node-2"]
    assert decision.create_pods == ()


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        (dict(exit_code=137, reason="OOMKilled"), "KilledBySignal"),
        (dict(exit_code=1, disrupted=True), "PodDisrupted"),
        (dict(reason="Evicted"), "PodLost"),
    ],
)
def test_infrastructure_failures_restart_rather_than_fail(job_spec, pod, reason):
    pods = [pod_view(0, "Running"), pod_view(1, "Failed", **pod), pod_view(2, "Running")]
    patch = decide(observe(job_spec, running_status(), pods), CONFIG).status_patch
    assert patch["phase"] == "Restarting"
    assert condition(patch, "Restarting")["reason"] == reason


def test_a_user_error_beats_a_retryable_failure_in_the_same_pass(job_spec):
    pods = [pod_view(0, "Failed", exit_code=137), pod_view(1, "Failed", exit_code=2), pod_view(2, "Running")]
    patch = decide(observe(job_spec, running_status(), pods), CONFIG).status_patch
    assert patch["phase"] == "Failed" and patch["lastFailure"]["pod"] == "cats-node-1"


def test_restart_budget_exhausted_fails_the_job(job_spec):
    pods = [pod_view(0, "Failed", exit_code=75, attempt=3), pod_view(1, "Running", attempt=3),
            pod_view(2, "Running", attempt=3)]
    patch = decide(observe(job_spec, running_status(attempt=3, restarts=2), pods), CONFIG).status_patch
    assert patch["phase"] == "Failed"
    assert condition(patch, "Failed")["reason"] == "MaxRestartsExceeded"
    assert "maxRestarts is 2" in condition(patch, "Failed")["message"]


def test_a_disruption_restarts_the_gang_without_spending_max_restarts(job_spec):
    # maxRestarts (2) is spent already; an eviction/preemption still restarts, counted apart.
    pods = [pod_view(0, "Failed", disrupted=True, attempt=3), pod_view(1, "Running", attempt=3),
            pod_view(2, "Running", attempt=3)]
    patch = decide(observe(job_spec, running_status(attempt=3, restarts=2), pods), CONFIG).status_patch
    assert patch["phase"] == "Restarting"
    assert condition(patch, "Restarting")["reason"] == "PodDisrupted"
    assert patch["attempt"] == 4 and patch["disruptions"] == 1
    assert "restarts" not in patch  # unchanged: still 2


def test_a_pod_being_evicted_is_a_disruption_before_it_has_failed(job_spec):
    # The Eviction API (and preemption) set DisruptionTarget and the deletionTimestamp together;
    # the operator usually sees the pod still Running, and must not charge maxRestarts for it.
    pods = [pod_view(0, "Running"), pod_view(1, "Running", deleting=True, disrupted=True), pod_view(2, "Running")]
    patch = decide(observe(job_spec, running_status(), pods), CONFIG).status_patch
    assert condition(patch, "Restarting")["reason"] == "PodDisrupted"
    assert patch["disruptions"] == 1 and "restarts" not in patch


def test_a_pod_deleted_by_someone_else_spends_the_restart_budget(job_spec):
    pods = [pod_view(0, "Running"), pod_view(1, "Running", deleting=True), pod_view(2, "Running")]
    patch = decide(observe(job_spec, running_status(), pods), CONFIG).status_patch
    assert condition(patch, "Restarting")["reason"] == "PodDeleted"
    assert patch["restarts"] == 1 and patch["disruptions"] == 0


def test_disruptions_are_bounded_separately(job_spec):
    pods = [pod_view(0, "Failed", disrupted=True, attempt=30), pod_view(1, "Running", attempt=30),
            pod_view(2, "Running", attempt=30)]
    status = running_status(attempt=30, restarts=0, disruptions=MAX_DISRUPTIONS)
    decision = decide(observe(job_spec, status, pods), CONFIG)
    failed = condition(decision.status_patch, "Failed")
    assert decision.status_patch["phase"] == "Failed" and failed["reason"] == "MaxDisruptionsExceeded"
    assert f"at most {MAX_DISRUPTIONS}" in failed["message"]
    assert sorted(decision.delete_pods) == ["cats-node-1", "cats-node-2"]


def test_the_backoff_counts_restarts_after_disruptions_too(job_spec):
    restarted = "2026-05-01T11:59:55Z"  # 5 s ago; the second gang restart waits 2 x 10 s
    status = {"phase": "Restarting", "attempt": 3, "restarts": 1, "disruptions": 1, "conditions": [
        {"type": "Restarting", "status": "True", "reason": "PodDisrupted", "message": "",
         "lastTransitionTime": restarted}]}
    decision = decide(observe(job_spec, status, [], service_account_exists=True), CONFIG)
    assert decision.create_pods == () and decision.requeue_after == pytest.approx(15.0)


def test_a_new_attempt_waits_until_the_old_pods_are_gone(job_spec):
    status = running_status(phase="Restarting", attempt=2, restarts=1)
    pods = [pod_view(0, "Running", attempt=1, deleting=True), pod_view(1, "Failed", attempt=1)]
    decision = decide(observe(job_spec, status, pods, service_account_exists=True), CONFIG)
    assert decision.create_pods == ()
    assert decision.delete_pods == ("cats-node-1",)  # the one not yet being deleted
    assert decision.requeue_after is not None


def test_a_new_attempt_waits_for_the_backoff_then_creates_all_pods(job_spec):
    restarted = "2026-05-01T11:59:55Z"  # 5 s ago; backoff for the first restart is 10 s
    status = {"phase": "Restarting", "attempt": 2, "restarts": 1, "conditions": [
        {"type": "Restarting", "status": "True", "reason": "RetryableExit", "message": "",
         "lastTransitionTime": restarted}]}
    early = decide(observe(job_spec, status, [], service_account_exists=True), CONFIG)
    assert early.create_pods == () and early.requeue_after == pytest.approx(5.0)
    later = decide(observe(job_spec, status, [], service_account_exists=True,
                           now=NOW + dt.timedelta(seconds=6)), CONFIG)
    assert created_names(later) == ["cats-node-0", "cats-node-1", "cats-node-2"]
    assert all(m["metadata"]["labels"][contract.LABEL_ATTEMPT] == "2" for m in later.create_pods)
    env = {e["name"]: e["value"] for e in later.create_pods[0]["spec"]["containers"][0]["env"]}
    assert env[contract.ENV_ATTEMPT] == "2"
    assert later.status_patch["phase"] == "Created"
    assert condition(later.status_patch, "Restarting")["status"] == "False"


def test_all_pods_succeeded_finishes_the_job_and_deletes_nothing(job_spec):
    pods = [pod_view(r, "Succeeded", exit_code=0) for r in range(3)]
    status = running_status(progress={"step": 8, "totalSteps": 8, "loss": "0.12"})
    decision = decide(observe(job_spec, status, pods), CONFIG)
    patch = decision.status_patch
    assert patch["phase"] == "Succeeded"
    assert condition(patch, "Succeeded")["status"] == "True"
    assert condition(patch, "Running")["status"] == "False"
    assert patch["completionTime"] == "2026-05-01T12:00:00Z"
    assert "progress" not in patch  # the trainer's field
    assert decision.delete_pods == () and decision.create_pods == ()


def test_a_pod_that_vanishes_from_a_running_job_restarts_the_gang(job_spec):
    pods = [pod_view(0, "Running"), pod_view(2, "Running")]
    patch = decide(observe(job_spec, running_status(), pods), CONFIG).status_patch
    assert patch["phase"] == "Restarting"
    assert condition(patch, "Restarting")["reason"] == "PodLost"


def test_invalid_spec_fails_with_the_field_in_the_message(job_spec):
    job_spec["model"]["uri"] = "ftp://host/flux"
    decision = decide(observe(job_spec), CONFIG)
    failed = condition(decision.status_patch, "Failed")
    assert decision.status_patch["phase"] == "Failed"
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("spec.model.uri: ftp:// is not supported")
    assert decision.create_pods == ()


def test_missing_service_account_fails_instead_of_stalling(job_spec):
    job_spec["resources"]["serviceAccountName"] = "storage"
    decision = decide(observe(job_spec, service_account_exists=False), CONFIG)
    failed = condition(decision.status_patch, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.resources.serviceAccountName" in failed["message"] and "'storage'" in failed["message"]
    assert decision.create_pods == () and decision.create_access == ()


def test_the_trainer_account_and_role_are_created_with_every_batch_of_pods(job_spec):
    decision = decide(observe(job_spec, service_exists=False), CONFIG)
    assert [(m["kind"], m["metadata"]["name"]) for m in decision.create_access] == [
        ("ServiceAccount", "cats-trainer"), ("Role", "cats-trainer"), ("RoleBinding", "cats-trainer")]
    assert {p["spec"]["serviceAccountName"] for p in decision.create_pods} == {"cats-trainer"}
    # A later attempt creates them again (a 409 adopts them): one deleted meanwhile comes back.
    status = {"phase": "Created", "attempt": 2, "restarts": 1}
    again = decide(observe(job_spec, status, []), CONFIG)
    assert len(again.create_pods) == 3 and len(again.create_access) == 3
    # No pods to create, nothing else either.
    running = decide(observe(job_spec, running_status(), [pod_view(r, "Running") for r in range(3)]), CONFIG)
    assert running.create_access == ()


def test_a_user_named_account_is_bound_to_the_jobs_role_and_not_created(job_spec):
    job_spec["resources"]["serviceAccountName"] = "storage"
    decision = decide(observe(job_spec, service_account_exists=True), CONFIG)
    assert [m["kind"] for m in decision.create_access] == ["Role", "RoleBinding"]
    assert decision.create_access[1]["subjects"] == [{"kind": "ServiceAccount", "name": "storage",
                                                      "namespace": "team-a"}]
    assert {p["spec"]["serviceAccountName"] for p in decision.create_pods} == {"storage"}


def test_a_finished_job_frees_pods_still_running_and_stays_finished(job_spec):
    status = {"phase": "Failed", "attempt": 1, "restarts": 0, "completionTime": "2026-05-01T11:00:00Z"}
    pods = [pod_view(0, "Running"), pod_view(1, "Failed", exit_code=1), pod_view(2, "Succeeded")]
    decision = decide(observe(job_spec, status, pods), CONFIG)
    assert decision.delete_pods == ("cats-node-0",)
    assert decision.status_patch.get("phase") is None and decision.create_pods == ()


def test_ttl_after_finished_deletes_the_job(job_spec):
    job_spec["runPolicy"]["ttlSecondsAfterFinished"] = 60
    status = {"phase": "Succeeded", "completionTime": "2026-05-01T11:58:00Z"}
    assert decide(observe(job_spec, status, []), CONFIG).delete_job is True
    status["completionTime"] = "2026-05-01T11:59:30Z"
    kept = decide(observe(job_spec, status, []), CONFIG)
    assert kept.delete_job is False and kept.requeue_after == pytest.approx(30.0)


def test_suspend_deletes_pods_and_resume_starts_a_fresh_attempt(job_spec):
    job_spec["runPolicy"]["suspend"] = True
    pods = [pod_view(r, "Running") for r in range(3)]
    suspended = decide(observe(job_spec, running_status(), pods), CONFIG)
    assert suspended.status_patch["phase"] == "Suspended"
    assert sorted(suspended.delete_pods) == ["cats-node-0", "cats-node-1", "cats-node-2"]
    job_spec["runPolicy"]["suspend"] = False
    status = {**running_status(), **suspended.status_patch}
    resumed = decide(observe(job_spec, status, [], service_account_exists=True), CONFIG)
    assert resumed.status_patch["attempt"] == 2
    assert condition(resumed.status_patch, "Suspended")["status"] == "False"
    assert len(resumed.create_pods) == 3


def test_pods_stuck_pending_past_the_startup_deadline_fail_the_job(job_spec):
    job_spec["runPolicy"]["startupDeadlineSeconds"] = 60
    old = NOW - dt.timedelta(seconds=61)
    pods = [pod_view(0, "Running"), pod_view(1, "Pending", created_at=old, reason="ImagePullBackOff"),
            pod_view(2, "Running")]
    decision = decide(observe(job_spec, {"phase": "Created", "attempt": 1}, pods), CONFIG)
    failed = condition(decision.status_patch, "Failed")
    assert failed["reason"] == "StartupDeadlineExceeded" and "ImagePullBackOff" in failed["message"]


def test_active_deadline_fails_a_job_that_runs_too_long(job_spec):
    job_spec["runPolicy"]["activeDeadlineSeconds"] = 30
    pods = [pod_view(r, "Running") for r in range(3)]
    decision = decide(observe(job_spec, running_status(), pods), CONFIG)
    assert condition(decision.status_patch, "Failed")["reason"] == "DeadlineExceeded"
    assert len(decision.delete_pods) == 3


def test_pods_of_an_older_job_with_the_same_name_block_creation(job_spec):
    foreign = [pod_view(0, "Running", uid="another-uid", deleting=True)]
    decision = decide(observe(job_spec, {}, foreign, service_account_exists=True), CONFIG)
    assert decision.create_pods == () and decision.requeue_after is not None


def test_a_job_being_deleted_is_left_to_garbage_collection(job_spec):
    decision = decide(observe(job_spec, running_status(), [pod_view(0)], deleting=True), CONFIG)
    assert decision.status_patch == {} and decision.delete_pods == () and decision.create_pods == ()


def test_log_tails_are_read_only_for_failed_pods_of_a_live_job():
    pods = [pod_view(0, "Failed", exit_code=1), pod_view(1, "Running"), pod_view(2, "Failed", attempt=0)]
    assert pods_needing_log_tail({"phase": "Running", "attempt": 1}, pods, UID) == ["cats-node-0"]
    assert pods_needing_log_tail({"phase": "Failed", "attempt": 1}, pods, UID) == []


def test_backoff_doubles_per_restart_and_is_capped():
    assert [backoff_seconds(10, n) for n in (0, 1, 2, 3)] == [0.0, 10.0, 20.0, 40.0]
    assert backoff_seconds(3000, 5) == 3600.0


def test_resuming_resets_the_active_deadline_clock(job_spec):
    """As Kubernetes Jobs reset status.startTime on resume: time spent suspended does not count
    against activeDeadlineSeconds."""
    job_spec["runPolicy"]["activeDeadlineSeconds"] = 600
    started_long_ago = {**running_status(startTime="2026-04-01T12:00:00Z"), "phase": "Suspended",
                        "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended",
                                        "message": "", "lastTransitionTime": "2026-04-01T12:05:00Z"}]}
    resumed = decide(observe(job_spec, started_long_ago, [], service_account_exists=True), CONFIG)
    patch = resumed.status_patch
    assert patch["phase"] == "Created" and "Failed" not in {c["type"] for c in patch["conditions"]}
    assert len(resumed.create_pods) == 3
    assert patch["startTime"] == "2026-05-01T12:00:00Z"  # the clock starts again with the new pods
    # Ten minutes later the resumed job has used up its own deadline, not the suspended time.
    later = {**started_long_ago, **patch}
    timed_out = decide(observe(job_spec, later, [pod_view(r, "Running", attempt=2) for r in range(3)],
                               now=NOW + dt.timedelta(seconds=601)), CONFIG)
    assert condition(timed_out.status_patch, "Failed")["reason"] == "DeadlineExceeded"


def test_resuming_while_old_pods_linger_clears_the_start_time_until_new_pods_exist(job_spec):
    job_spec["runPolicy"]["activeDeadlineSeconds"] = 600
    suspended = {**running_status(startTime="2026-04-01T12:00:00Z"), "phase": "Suspended"}
    lingering = [pod_view(0, "Running", deleting=True)]
    resumed = decide(observe(job_spec, suspended, lingering), CONFIG)
    assert resumed.status_patch["startTime"] is None  # merge patch: removed until pods are created
    assert resumed.status_patch["phase"] == "Pending" and resumed.create_pods == ()


def test_a_progress_patch_by_the_trainer_costs_no_operator_status_write(job_spec):
    """The Progress column reads status.progress.text, which the trainer sends itself; the
    operator used to mirror it into status.progressText, one extra write per progress patch."""
    pods = [pod_view(r, "Running") for r in range(3)]
    first = decide(observe(job_spec, running_status(progress={"step": 3, "totalSteps": 8, "text": "3/8"}),
                           pods), CONFIG)
    settled = {**running_status(), **first.status_patch}
    moved = {**settled, "progress": {"step": 4, "totalSteps": 8, "text": "4/8", "loss": "0.5"}}
    again = decide(observe(job_spec, moved, pods), CONFIG)
    assert again.status_patch == {}
    assert again.create_pods == () and again.delete_pods == () and again.events == ()


# --- a restart waiting for pods that do not go (stuck Terminating) ----------------------------

def restarting_status(**fields: Any) -> dict[str, Any]:
    return {"phase": "Restarting", "attempt": 2, "restarts": 1, "startTime": "2026-05-01T11:50:00Z",
            "conditions": [{"type": "Restarting", "status": "True", "reason": "KilledBySignal",
                            "message": "pod cats-node-0 was killed; restarting all pods as attempt 2",
                            "lastTransitionTime": "2026-05-01T11:58:00Z"}], **fields}


def stuck(rank: int, *, due_ago: float = 60, node: str | None = "gpu-7", **fields: Any):
    """A pod of attempt 1 whose deletion was due `due_ago` seconds ago."""
    fields.setdefault("deletion_grace_seconds", 30)
    return pod_view(rank, "Running", attempt=1, deleting=True, node_name=node,
                    deletion_due=NOW - dt.timedelta(seconds=due_ago), **fields)


@pytest.mark.parametrize("node_state", [reconcile.NODE_MISSING, reconcile.NODE_NOT_READY])
def test_a_pod_stuck_terminating_on_a_lost_node_is_force_deleted(job_spec, node_state):
    pods = [stuck(0), stuck(1, node="gpu-8")]
    decision = decide(observe(job_spec, restarting_status(), pods,
                              node_states={"gpu-7": node_state, "gpu-8": reconcile.NODE_READY}), CONFIG)
    assert decision.force_delete_pods == ("cats-node-0",)  # gpu-8 is Ready: its kubelet will confirm
    assert decision.create_pods == ()
    message = condition(decision.status_patch, "Restarting")["message"]
    assert "cats-node-0" in message and f"node gpu-7 {node_state}, force-deleted" in message
    assert "cats-node-1" in message and "node gpu-8 Ready" in message
    assert "deletion due 2026-05-01T11:59:00Z, grace 30s" in message
    forced = [e for e in decision.events if e.reason == "ForceDeleted"]
    assert len(forced) == 1 and "cats-node-0" in forced[0].message and node_state in forced[0].message


def test_a_pod_held_by_a_finalizer_is_reported_once_and_not_force_deleted(job_spec):
    pods = [stuck(0, finalizers=("example.com/hold",))]
    first = decide(observe(job_spec, restarting_status(), pods, node_states={"gpu-7": reconcile.NODE_READY}),
                   CONFIG)
    assert first.force_delete_pods == () and first.create_pods == ()
    message = condition(first.status_patch, "Restarting")["message"]
    assert message.startswith("attempt 2 waits for pods of an earlier attempt to go: cats-node-0 (")
    assert "finalizers example.com/hold" in message
    assert [e.reason for e in first.events] == ["WaitingForPods"]
    assert first.requeue_after == reconcile.STUCK_RECHECK_SECONDS
    # The next passes find the same wait: no status write, no Event.
    settled = {**restarting_status(), **first.status_patch}
    again = decide(observe(job_spec, settled, pods, node_states={"gpu-7": reconcile.NODE_READY},
                           now=NOW + dt.timedelta(seconds=45)), CONFIG)
    assert again.status_patch == {} and again.events == ()


def test_a_pod_already_force_deleted_is_not_deleted_again(job_spec):
    pods = [stuck(0, deletion_grace_seconds=0, finalizers=("example.com/hold",))]
    decision = decide(observe(job_spec, restarting_status(), pods, node_states={"gpu-7": reconcile.NODE_MISSING}),
                      CONFIG)
    assert decision.force_delete_pods == ()
    assert "finalizers example.com/hold" in condition(decision.status_patch, "Restarting")["message"]


def test_pods_within_their_grace_period_are_waited_for_quietly(job_spec):
    pods = [stuck(0, due_ago=-20), stuck(1, due_ago=reconcile.TERMINATION_MARGIN_SECONDS - 1)]
    decision = decide(observe(job_spec, restarting_status(), pods), CONFIG)
    assert "conditions" not in decision.status_patch and decision.events == ()
    assert decision.force_delete_pods == () and decision.requeue_after == reconcile.WAIT_FOR_DELETION_SECONDS


def test_a_node_is_read_only_for_pods_stuck_past_their_grace_period():
    pods = [stuck(0), stuck(1, due_ago=1, node="gpu-8"), pod_view(2, "Running", node_name="gpu-9"),
            stuck(3, node="other-job-node", uid="another-uid")]
    assert reconcile.nodes_to_check({"phase": "Restarting"}, pods, UID, NOW) == ["gpu-7"]
    assert reconcile.nodes_to_check({"phase": "Failed"}, pods, UID, NOW) == []


def test_a_resumed_job_reports_pods_that_do_not_go_in_its_suspended_condition(job_spec):
    status = {"phase": "Suspended", "attempt": 1, "restarts": 0,
              "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended", "message": "",
                              "lastTransitionTime": "2026-05-01T11:00:00Z"}]}
    decision = decide(observe(job_spec, status, [stuck(0, finalizers=("example.com/hold",))],
                              node_states={"gpu-7": reconcile.NODE_READY}), CONFIG)
    suspended = condition(decision.status_patch, "Suspended")
    assert suspended["status"] == "False" and "cats-node-0" in suspended["message"]


# --- every message the operator writes is bounded -------------------------------------------

def test_a_huge_api_server_rejection_is_written_bounded(job_spec):
    """The API server's message for a pod it rejects can be any length (one line per invalid
    field); the CRD caps condition messages at 32 KiB and refuses the whole write beyond that."""
    server = "Pod \"cats-node-0\" is invalid: " + ", ".join(
        f"spec.containers[0].volumeMounts[{i}].mountPath: Invalid value: \"/{'x/..' * 200}\"" for i in range(64))
    assert len(server) > 32768
    decision = reconcile.rejected(observe(job_spec, {"phase": "Pending"}), "pod(s) cats-node-0", server)
    failed = condition(decision.status_patch, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert len(failed["message"]) <= st.MESSAGE_LIMIT
    assert failed["message"].startswith("the API server rejected pod(s) cats-node-0: Pod \"cats-node-0\" is invalid")
    assert "characters cut" in failed["message"] and failed["message"].endswith(server[-100:])
    assert all(len(e.message) <= st.EVENT_MESSAGE_LIMIT for e in decision.events)


def test_a_huge_log_tail_and_pod_message_are_bounded_in_last_failure(job_spec):
    pods = [pod_view(0, "Failed", exit_code=1, message="m" * 50_000), pod_view(1), pod_view(2)]
    decision = decide(observe(job_spec, running_status(), pods, log_tails={"cats-node-0": "line\n" * 20_000 + "last"}),
                      CONFIG)
    failure = decision.status_patch["lastFailure"]
    assert len(failure["message"]) <= st.MESSAGE_LIMIT and len(failure["logTail"]) <= st.MESSAGE_LIMIT
    assert "characters cut" in failure["logTail"] and failure["logTail"].endswith("line\n" * 3 + "last")
