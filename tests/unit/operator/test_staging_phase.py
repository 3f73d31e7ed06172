"""The Staging phase: a job whose model or dataset is a URI is Staging from the moment all its pods
run until rank 0 reports the current attempt's inputs complete; for everything else it counts as
Running (gang health, the time-to-running metric, the phase metric)."""

from __future__ import annotations

from typing import Any

from ltj_fixtures import pod_view
from test_reconcile import CONFIG, condition, observe

from lorakube import metrics
from lorakube import status as st
from lorakube.reconcile import decide
from lorakube_api import contract


def remote(job_spec: dict[str, Any]) -> dict[str, Any]:
    job_spec["model"]["uri"] = "s3://models/tiny-flux"
    return job_spec


def staging(attempt: int = 1, complete: bool = False, **fields: Any) -> dict[str, Any]:
    report = contract.Staging(attempt=attempt, input="model", uri="s3://models/tiny-flux", bytesDone=10,
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

    # reports in flight: nothing to write (the bytes live in status.progress, the trainer's field)
    during = decide(observe(spec, {**status, "progress": staging(1)}, RUNNING_PODS), CONFIG)
    assert during.status_patch == {} and during.events == ()

    done = decide(observe(spec, {**status, "progress": staging(1, complete=True)}, RUNNING_PODS), CONFIG)
    patch = done.status_patch
    assert patch["phase"] == "Running"
    assert condition(patch, "Running")["reason"] == "InputsStaged"
    assert condition(patch, "Staging")["status"] == "False"
    assert done.pods_running is None          # not a second time-to-running observation
    assert "progress" not in patch
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
