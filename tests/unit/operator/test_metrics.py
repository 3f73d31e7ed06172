"""The operator's metrics: the facts decide() reports for them, and how OperatorMetrics counts.

Each test builds its own OperatorMetrics on a fresh registry and reads it back through
prometheus-client's text exposition, as a scrape would."""

from __future__ import annotations

import datetime as dt

import pytest
from ltj_fixtures import NOW, pod_view
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_reconcile import CONFIG, observe, running_status

from lorakube import failures
from lorakube.metrics import RESTART_REASONS, OperatorMetrics
from lorakube.reconcile import decide


def samples(metrics: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def metrics() -> OperatorMetrics:
    return OperatorMetrics(CollectorRegistry())


# --- what decide() reports --------------------------------------------------------------------


def test_a_gang_restart_reports_its_failure_class(job_spec):
    pods = [pod_view(0, "Running"), pod_view(1, "Failed", exit_code=75), pod_view(2, "Running")]
    decision = decide(observe(job_spec, running_status(), pods), CONFIG)
    assert decision.status_patch["phase"] == "Restarting"
    assert decision.gang_restart == "RetryableExit"


def test_a_failed_job_or_a_steady_one_reports_no_restart(job_spec):
    failed = [pod_view(0, "Running"), pod_view(1, "Failed", exit_code=1), pod_view(2, "Running")]
    assert decide(observe(job_spec, running_status(), failed), CONFIG).gang_restart is None
    steady = [pod_view(r, "Running") for r in range(3)]
    assert decide(observe(job_spec, running_status(), steady), CONFIG).gang_restart is None


def test_every_failure_class_that_restarts_is_preset_in_the_counter():
    restarting = {rule.reason for rule in failures.RULES if rule.action is failures.Action.RESTART}
    deleted = failures.deleted_by_someone_else(pod_view(0, "Running", deleting=True)).rule.reason
    missing = failures.missing("cats-node-0", 0, 1).rule.reason
    stalled = failures.staging_stalled(pod_view(0, "Running"), "staged nothing").rule.reason
    assert restarting | {deleted, missing, stalled} == set(RESTART_REASONS)


def test_the_first_attempt_running_is_timed_from_the_jobs_creation(job_spec):
    status = {"phase": "Created", "attempt": 1, "restarts": 0}
    pods = [pod_view(r, "Running") for r in range(3)]
    created = NOW - dt.timedelta(seconds=42)
    decision = decide(observe(job_spec, status, pods, created_at=created), CONFIG)
    assert decision.status_patch["phase"] == "Running"
    assert decision.pods_running == ("first", 42.0)


def test_a_later_attempt_is_timed_from_its_first_pods_creation(job_spec):
    status = {**running_status(attempt=2, restarts=1), "phase": "Created"}
    pods = [pod_view(0, "Running", attempt=2, created_at=NOW - dt.timedelta(seconds=7)),
            pod_view(1, "Running", attempt=2, created_at=NOW - dt.timedelta(seconds=5)),
            pod_view(2, "Running", attempt=2, created_at=NOW - dt.timedelta(seconds=6))]
    decision = decide(observe(job_spec, status, pods, created_at=NOW - dt.timedelta(hours=3)), CONFIG)
    assert decision.status_patch["phase"] == "Running"
    assert decision.pods_running == ("later", 7.0)


def test_running_is_timed_once_per_attempt(job_spec):
    pods = [pod_view(r, "Running") for r in range(3)]
    decision = decide(observe(job_spec, running_status(), pods, created_at=NOW - dt.timedelta(seconds=9)), CONFIG)
    assert decision.pods_running is None, "the job was Running already: this attempt was measured"


# --- how OperatorMetrics counts -----------------------------------------------------------------


def test_a_written_decision_counts_its_restart_and_observes_its_time_to_running(metrics):
    before = samples(metrics)
    assert before[("lorakube_gang_restarts_total", (("reason", "PodDisrupted"),))] == 0
    assert before[("lorakube_job_time_to_running_seconds_count", (("attempt", "first"),))] == 0
    metrics.status_written("PodDisrupted", None)
    metrics.status_written(None, ("first", 12.5))
    metrics.status_written(None, None)
    after = samples(metrics)
    assert after[("lorakube_gang_restarts_total", (("reason", "PodDisrupted"),))] == 1
    assert after[("lorakube_gang_restarts_total", (("reason", "RetryableExit"),))] == 0
    assert after[("lorakube_job_time_to_running_seconds_count", (("attempt", "first"),))] == 1
    assert after[("lorakube_job_time_to_running_seconds_sum", (("attempt", "first"),))] == 12.5
    assert after[("lorakube_job_time_to_running_seconds_bucket", (("attempt", "first"), ("le", "10.0")))] == 0
    assert after[("lorakube_job_time_to_running_seconds_bucket", (("attempt", "first"), ("le", "20.0")))] == 1


def test_jobs_by_phase_counts_each_job_once_in_its_latest_phase_with_zeros(metrics):
    metrics.jobs.set("team-a", "cats", "Created")
    metrics.jobs.set("team-a", "cats", "Running")
    metrics.jobs.set("team-a", "dogs", "Running")
    metrics.jobs.set("team-b", "owls", "Succeeded")
    got = samples(metrics)
    assert got[("lorakube_jobs", (("namespace", "team-a"), ("phase", "Running")))] == 2
    assert got[("lorakube_jobs", (("namespace", "team-a"), ("phase", "Created")))] == 0
    assert got[("lorakube_jobs", (("namespace", "team-a"), ("phase", "Failed")))] == 0
    assert got[("lorakube_jobs", (("namespace", "team-b"), ("phase", "Succeeded")))] == 1
    metrics.jobs.set("team-b", "owls", None)    # deleted
    got = samples(metrics)
    assert not [key for key in got if key[0] == "lorakube_jobs" and ("namespace", "team-b") in key[1]]


def test_reconcile_errors_are_counted_by_exception_class(metrics):
    metrics.reconcile_failed(TimeoutError("read timed out"))
    metrics.reconcile_failed(TimeoutError("again"))
    metrics.reconcile_failed(ValueError("bad"))
    got = samples(metrics)
    assert got[("lorakube_reconcile_errors_total", (("reason", "TimeoutError"),))] == 2
    assert got[("lorakube_reconcile_errors_total", (("reason", "ValueError"),))] == 1


def test_the_leader_gauge_reads_the_leadership_at_each_scrape(metrics):
    assert samples(metrics)[("lorakube_leader", ())] == 0
    leading = [False]
    metrics.track_leadership(lambda: leading[0])
    assert samples(metrics)[("lorakube_leader", ())] == 0
    leading[0] = True
    assert samples(metrics)[("lorakube_leader", ())] == 1
