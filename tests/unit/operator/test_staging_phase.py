"""The Staging phase: a job whose model or dataset is a URI is Staging from the moment all its pods
run until rank 0 reports the current attempt's inputs complete; for everything else it counts as
Running (gang health, the time-to-running metric, the phase metric)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ltj_fixtures import NOW, UID, pod_view
from test_reconcile import CONFIG, condition, observe

from lorakube import metrics
from lorakube import status as st
from lorakube.reconcile import decide, pods_needing_log_tail
from lorakube.spec import parse_job
from lorakube_api import contract


def remote(job_spec: dict[str, Any]) -> dict[str, Any]:
    job_spec["model"]["uri"] = "s3://models/tiny-flux"
    return job_spec


def staging(attempt: int = 1, complete: bool = False, bytesDone: int = 10, **fields: Any) -> dict[str, Any]:
    report = contract.Staging(attempt=attempt, input="model", uri="s3://models/tiny-flux", bytesDone=bytesDone,
                              bytesTotal=10 if complete else 100, cached=False, complete=complete,
                              updatedAt="2026-05-01T12:00:00Z")
    return {**report.to_status(), **fields}


def settle(job_spec, status, pods):
    """Decide, then decide again on the written status (what the next pass sees)."""
    first = decide(observe(job_spec, status, pods), CONFIG)
    return first, {**status, **first.status_patch}


RUNNING_PODS = [pod_view(r, "Running") for r in range(3)]
CREATED = {"phase": "Created", "attempt": 1, "restarts": 0}


# --- the pure rule ------------------------------------------------------------------------------

def test_active_phase_is_running_for_local_inputs_and_staging_until_this_attempts_report_is_complete():
    assert st.active_phase(st.CREATED, False, None, 1) == st.RUNNING_PHASE
    assert st.active_phase(st.CREATED, True, None, 1) == st.STAGING
    assert st.active_phase(st.STAGING, True, staging(1), 1) == st.STAGING
    assert st.active_phase(st.STAGING, True, staging(1, complete=True), 1) == st.RUNNING_PHASE
    # the complete report of attempt 1 says nothing about attempt 2's pods
    assert st.active_phase(st.CREATED, True, staging(1, complete=True), 2) == st.STAGING
    # once Running, an attempt never goes back to Staging (a stale or reset report)
    assert st.active_phase(st.RUNNING_PHASE, True, {}, 1) == st.RUNNING_PHASE


def test_staged_uris_are_those_with_a_scheme():
    assert contract.is_staged_uri("s3://b/p") and contract.is_staged_uri("hf://org/model")
    assert not contract.is_staged_uri("/data/model") and not contract.is_staged_uri("")


def test_staging_report_hides_credentials_in_the_uri_and_fits_the_progress_column():
    report = contract.Staging(attempt=2, input="dataset", uri="https://user:secret@host/set.tar?token=abc#x",
                              bytesDone=13_107_200, bytesTotal=356_725_146, cached=False, complete=False,
                              updatedAt="2026-05-01T12:00:00Z")
    body = report.to_status()
    assert body["staging"]["uri"] == "https://host/set.tar"
    assert "secret" not in report.to_json_line() and "abc" not in report.to_json_line()
    assert body["text"] == "dataset 12.5/340.2 MiB" and len(body["text"]) <= 32
    assert contract.Staging(1, "model", "s3://b/m", 0, None, False, False, "t").to_status()["text"] == "model 0 B"
    assert contract.Staging(1, "model", "s3://b/m", 3 << 30, 5 << 30, False, False, "t").to_status()["text"] \
        == "model 3.0/5.0 GiB"


# --- decide() -----------------------------------------------------------------------------------

def test_all_pods_running_with_a_remote_model_moves_the_job_to_staging_then_running(job_spec):
    spec = remote(job_spec)
    first, status = settle(spec, CREATED, RUNNING_PODS)
    patch = first.status_patch
    assert patch["phase"] == "Staging"
    assert condition(patch, "Staging")["status"] == "True"
    assert condition(patch, "Staging")["reason"] == "StagingInputs"
    assert "s3://models/tiny-flux" in condition(patch, "Staging")["message"]
    assert first.pods_running is not None and first.pods_running[0] == "first"   # measured once, here
    assert [e.reason for e in first.events] == ["StagingInputs"]

    # the first report is noted for the stall rule (by the operator's clock); the bytes themselves
    # live in status.progress, the trainer's field
    during = decide(observe(spec, {**status, "progress": staging(1)}, RUNNING_PODS), CONFIG)
    assert during.status_patch == {"stagingSeen": {"attempt": 1, "input": "model", "bytesDone": 10,
                                                   "at": "2026-05-01T12:00:00Z"}}
    assert during.events == ()
    status = {**status, **during.status_patch}
    # the same report again, or a newer one within the refresh period: nothing to write
    again = decide(observe(spec, {**status, "progress": staging(1)}, RUNNING_PODS), CONFIG)
    assert again.status_patch == {} and again.events == ()
    newer = decide(observe(spec, {**status, "progress": staging(1, bytesDone=50)}, RUNNING_PODS,
                           now=NOW + dt.timedelta(seconds=5)), CONFIG)
    assert newer.status_patch == {}

    done = decide(observe(spec, {**status, "progress": staging(1, complete=True)}, RUNNING_PODS), CONFIG)
    patch = done.status_patch
    assert patch["phase"] == "Running"
    assert condition(patch, "Running")["reason"] == "InputsStaged"
    assert condition(patch, "Staging")["status"] == "False"
    assert done.pods_running is None          # not a second time-to-running observation
    assert "progress" not in patch
    assert patch["stagingSeen"] is None       # the note serves the Staging phase only
    # and the next pass keeps it that way: no second Running transition, no write
    running = {**status, **patch, "progress": staging(1, complete=True)}
    later = decide(observe(spec, running, RUNNING_PODS), CONFIG)
    assert later.status_patch == {} and later.events == ()


def test_a_job_with_local_inputs_goes_straight_to_running(job_spec):
    first, _ = settle(job_spec, CREATED, RUNNING_PODS)
    assert first.status_patch["phase"] == "Running"
    assert all(c["type"] != "Staging" for c in first.status_patch["conditions"])


def test_a_pretrained_lora_in_a_bucket_is_staged_too(job_spec):
    """The trainer stages and reports spec.model.pretrainedLoraUri like the model (input pretrainedLora)."""
    job_spec["model"]["pretrainedLoraUri"] = "s3://loras/cats-v1"
    first, status = settle(job_spec, CREATED, RUNNING_PODS)
    assert first.status_patch["phase"] == "Staging"
    assert "s3://loras/cats-v1" in condition(first.status_patch, "Staging")["message"]
    report = contract.Staging(attempt=1, input="pretrainedLora", uri="s3://loras/cats-v1", bytesDone=5,
                              bytesTotal=5, cached=False, complete=True, updatedAt="2026-05-01T12:00:00Z")
    done = decide(observe(job_spec, {**status, "progress": report.to_status()}, RUNNING_PODS), CONFIG)
    assert done.status_patch["phase"] == "Running"
    during = contract.Staging(1, "pretrainedLora", "s3://loras/cats-v1", 126_248_550, 356_725_146, False, False, "t")
    assert during.to_status()["text"] == "pretrainedLora 120.4/340.2 MiB"      # fits the Progress column


def test_a_new_attempt_stages_again_whatever_the_last_attempt_reported(job_spec):
    spec = remote(job_spec)
    status = {"phase": "Created", "attempt": 2, "restarts": 1, "progress": staging(1, complete=True)}
    pods = [pod_view(r, "Running", attempt=2) for r in range(3)]
    assert decide(observe(spec, status, pods), CONFIG).status_patch["phase"] == "Staging"


def test_a_pod_lost_while_staging_restarts_the_gang_as_in_running(job_spec):
    spec = remote(job_spec)
    _, status = settle(spec, CREATED, RUNNING_PODS)
    patch = decide(observe(spec, status, RUNNING_PODS[:2]), CONFIG).status_patch
    assert patch["phase"] == "Restarting"
    assert condition(patch, "Restarting")["reason"] == "PodLost"
    assert condition(patch, "Staging")["status"] == "False"


def test_a_failed_pod_while_staging_fails_the_job(job_spec):
    spec = remote(job_spec)
    _, status = settle(spec, CREATED, RUNNING_PODS)
    pods = [pod_view(0, "Failed", exit_code=1), *RUNNING_PODS[1:]]
    patch = decide(observe(spec, status, pods), CONFIG).status_patch
    assert patch["phase"] == "Failed" and condition(patch, "Staging")["status"] == "False"


def test_the_phase_metric_lists_staging_and_queued():
    jobs = metrics.JobPhases()
    jobs.set("team-a", "cats", "Staging")
    counts = jobs.counts()
    assert counts[("team-a", "Staging")] == 1 and counts[("team-a", "Queued")] == 0


# --- the stall rule (spec.runPolicy.stagingProgressDeadlineSeconds) -----------------------------

def at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


def staging_since(seconds_ago: float, **fields: Any) -> dict[str, Any]:
    """A job Staging since `seconds_ago` before NOW (its condition's transition)."""
    since = (NOW - dt.timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"phase": "Staging", "attempt": 1, "restarts": 0, "disruptions": 0, "startTime": since,
            "observedGeneration": 1, "nodes": st.node_entries(RUNNING_PODS), "readyNodes": "3/3",
            "conditions": [{"type": "Staging", "status": "True", "reason": "StagingInputs", "message": "m",
                            "lastTransitionTime": since, "observedGeneration": 1}], **fields}


def with_deadline(job_spec: dict[str, Any], seconds: int | None = None, **run_policy: Any) -> dict[str, Any]:
    spec = remote(job_spec)
    if seconds is not None:
        run_policy["stagingProgressDeadlineSeconds"] = seconds
    spec.setdefault("runPolicy", {}).update(run_policy)
    return spec


def test_staging_with_no_report_at_all_restarts_the_gang_after_the_deadline(job_spec):
    spec = with_deadline(job_spec, 60, maxRestarts=2)
    # 59 s in: not yet, and the pass asks to look again when the deadline is due
    early = decide(observe(spec, staging_since(59), RUNNING_PODS), CONFIG)
    assert early.status_patch == {} and early.requeue_after == 1.0
    late = decide(observe(spec, staging_since(61), RUNNING_PODS), CONFIG)
    patch = late.status_patch
    assert patch["phase"] == "Restarting" and patch["attempt"] == 2 and patch["restarts"] == 1
    restarting = condition(patch, "Restarting")
    assert restarting["reason"] == contract.STAGING_STALLED == "StagingStalled"
    assert "sent no staging report in 60s of Staging" in restarting["message"]
    assert "spec.runPolicy.stagingProgressDeadlineSeconds is 60" in restarting["message"]
    assert condition(patch, "Staging")["status"] == "False"
    assert patch["lastFailure"]["reason"] == "StagingStalled" and patch["lastFailure"]["pod"] == "cats-node-0"
    assert sorted(late.delete_pods) == ["cats-node-0", "cats-node-1", "cats-node-2"]
    assert late.gang_restart == "StagingStalled"
    assert [e.reason for e in late.events] == ["StagingStalled"]


def test_bytes_that_stop_arriving_restart_the_gang_measured_from_the_last_change_the_operator_saw(job_spec):
    spec = with_deadline(job_spec, 60)
    status = staging_since(300, progress=staging(1, bytesDone=40))
    # The operator notes the report when it first sees it (its own clock, not the trainer's updatedAt)...
    first = decide(observe(spec, status, RUNNING_PODS), CONFIG)
    assert first.status_patch["stagingSeen"] == {"attempt": 1, "input": "model", "bytesDone": 40,
                                                 "at": "2026-05-01T12:00:00Z"}
    status = {**status, **first.status_patch}
    # ...and the same bytes 59 s later are not a stall yet, 61 s later they are
    assert decide(observe(spec, status, RUNNING_PODS, now=at(59)), CONFIG).status_patch == {}
    stalled = decide(observe(spec, status, RUNNING_PODS, now=at(61)), CONFIG).status_patch
    assert stalled["phase"] == "Restarting"
    message = condition(stalled, "Restarting")["message"]
    assert "staged nothing new for 60s" in message and "model s3://models/tiny-flux stuck at 40 of 100 bytes" in message
    assert stalled["stagingSeen"] is None


def test_bytes_that_keep_arriving_never_stall_and_cost_one_status_write_per_refresh(job_spec):
    spec = with_deadline(job_spec, 60)
    status = staging_since(0)
    writes = 0
    for second in range(0, 600, 2):        # a report every 2 s for 10 minutes, 1 KiB more each time
        report = staging(1, bytesDone=1024 * (second + 1))
        decision = decide(observe(spec, {**status, "progress": report}, RUNNING_PODS, now=at(second)), CONFIG)
        assert decision.status_patch.get("phase") is None, second
        if decision.status_patch:
            writes += 1
            status = {**status, **decision.status_patch}
    # a note once it is a quarter of the deadline (15 s) old, so every 16 s with a report every 2 s:
    # 38 writes in 600 s instead of one per report (300)
    assert writes == 38


def test_a_note_or_report_of_an_earlier_attempt_does_not_count(job_spec):
    spec = with_deadline(job_spec, 60)
    pods = [pod_view(r, "Running", attempt=2) for r in range(3)]
    status = {**staging_since(61), "attempt": 2, "restarts": 1, "progress": staging(1, bytesDone=99),
              "stagingSeen": {"attempt": 1, "input": "model", "bytesDone": 99, "at": "2026-05-01T11:59:59Z"}}
    patch = decide(observe(spec, status, pods), CONFIG).status_patch
    assert condition(patch, "Restarting")["reason"] == "StagingStalled"
    assert "sent no staging report" in condition(patch, "Restarting")["message"]


def test_a_stall_with_the_restart_budget_spent_fails_the_job(job_spec):
    spec = with_deadline(job_spec, 60, maxRestarts=1)
    patch = decide(observe(spec, staging_since(61, restarts=1), RUNNING_PODS), CONFIG).status_patch
    assert patch["phase"] == "Failed"
    assert condition(patch, "Failed")["reason"] == "MaxRestartsExceeded"
    assert "sent no staging report" in condition(patch, "Failed")["message"]
    assert patch["lastFailure"]["reason"] == "StagingStalled"


# What the trainer printed last while staging (its staging report lines), as the pod log gives it.
STALL_TAIL = "\n".join(contract.Staging(1, "model", "s3://models/tiny-flux", done, 100, False, False,
                                         "2026-05-01T12:00:00Z").to_json_line() for done in (0, 40))


def test_rank_0s_log_tail_is_read_in_the_pass_the_stall_fires_and_lands_in_last_failure(job_spec):
    spec = with_deadline(job_spec, 60)
    parsed = parse_job("cats", spec)
    status = staging_since(0, progress=staging(1, bytesDone=40),
                           stagingSeen={"attempt": 1, "input": "model", "bytesDone": 40, "at": "2026-05-01T12:00:00Z"})
    # Before the deadline (and with the same bytes) no log is read: a Staging pass costs no log read...
    assert pods_needing_log_tail(status, RUNNING_PODS, UID, parsed, at(59)) == []
    # ...nor when there is a report the operator has not noted yet (noting it restarts the clock)...
    moved = {**status, "progress": staging(1, bytesDone=41)}
    assert pods_needing_log_tail(moved, RUNNING_PODS, UID, parsed, at(61)) == []
    # ...only in the pass where the rule fires: rank 0's, the rank that stages.
    assert pods_needing_log_tail(status, RUNNING_PODS, UID, parsed, at(61)) == ["cats-node-0"]
    # Without the spec (an invalid one) or once Running, the stall rule does not apply.
    assert pods_needing_log_tail(status, RUNNING_PODS, UID) == []
    assert pods_needing_log_tail({**status, "phase": "Running"}, RUNNING_PODS, UID, parsed, at(61)) == []

    decision = decide(observe(spec, status, RUNNING_PODS, now=at(61), log_tails={"cats-node-0": STALL_TAIL}), CONFIG)
    failure = decision.status_patch["lastFailure"]
    assert failure["reason"] == "StagingStalled" and failure["pod"] == "cats-node-0"
    assert failure["logTail"] == STALL_TAIL


def test_the_log_tail_is_read_exactly_when_decide_finds_the_stall(job_spec):
    """The read (observe) and the rule (decide) share one clock: every second around the
    deadline, with and without a report, the tail is read in the pass that restarts and no other."""
    spec = with_deadline(job_spec, 60)
    parsed = parse_job("cats", spec)
    seen = {"attempt": 1, "input": "model", "bytesDone": 40, "at": "2026-05-01T12:00:30Z"}
    for status in (staging_since(0), staging_since(0, progress=staging(1, bytesDone=40), stagingSeen=seen)):
        for second in range(50, 100):
            reads = pods_needing_log_tail(status, RUNNING_PODS, UID, parsed, at(second))
            stalled = decide(observe(spec, status, RUNNING_PODS, now=at(second)), CONFIG).gang_restart
            assert (reads == ["cats-node-0"]) == (stalled == "StagingStalled"), (second, reads, stalled)
            assert reads in ([], ["cats-node-0"])


def test_the_default_deadline_is_ten_minutes_and_the_field_is_checked(job_spec):
    spec = remote(job_spec)
    assert decide(observe(spec, staging_since(599), RUNNING_PODS), CONFIG).status_patch == {}
    assert decide(observe(spec, staging_since(601), RUNNING_PODS), CONFIG).status_patch["phase"] == "Restarting"
    bad = decide(observe(with_deadline(job_spec, 5), staging_since(0), RUNNING_PODS), CONFIG).status_patch
    assert condition(bad, "Failed")["reason"] == "InvalidSpec"
    assert "spec.runPolicy.stagingProgressDeadlineSeconds: must be at least 10, got 5" in condition(bad, "Failed")["message"]


def test_the_end_of_staging_says_how_long_it_took(job_spec):
    status = {**staging_since(95), "progress": staging(1, complete=True)}
    decision = decide(observe(remote(job_spec), status, RUNNING_PODS), CONFIG)
    assert decision.status_patch["phase"] == "Running"
    (event,) = decision.events
    assert event.reason == "InputsStaged"
    assert event.message == "all 3 pods of attempt 1 are running; rank 0 staged its inputs in 95 s and trains"


def test_running_jobs_are_never_judged_by_the_stall_rule(job_spec):
    spec = with_deadline(job_spec, 60)
    status = {**staging_since(3600), "phase": "Running"}
    assert decide(observe(spec, status, RUNNING_PODS), CONFIG).status_patch == {}
