"""Derived status fields, conditions, and reading pod bodies."""

from __future__ import annotations

import datetime as dt
import re

from ltj_fixtures import NOW, UID, pod_view

from lorakube import pods, status
from lorakube_api import contract


def test_the_progress_column_text_comes_with_the_trainers_progress():
    progress = contract.Progress(step=37, totalSteps=120, epoch=0, loss=0.2, samplesPerSecond=None,
                                 etaSeconds=None, updatedAt="2026-05-01T12:00:00Z")
    assert progress.to_status()["text"] == "37/120"
    assert "progressText" not in status.OPERATOR_KEYS


def test_ready_nodes_counts_running_and_finished_pods():
    views = [pod_view(0, "Running"), pod_view(1, "Succeeded"), pod_view(2, "Pending"),
             pod_view(3, "Running", deleting=True)]
    assert status.ready_nodes(views, 4) == "2/4"


def test_condition_time_moves_only_when_its_status_flips():
    later = NOW + dt.timedelta(minutes=5)
    first = status.set_condition([], "Running", True, "AllPodsRunning", "m", NOW, 1)
    same = status.set_condition(first, "Running", True, "AllPodsRunning", "m2", later, 2)
    assert same[0]["lastTransitionTime"] == "2026-05-01T12:00:00Z" and same[0]["message"] == "m2"
    flipped = status.set_condition(same, "Running", False, "AllPodsSucceeded", "done", later, 2)
    assert flipped[0]["lastTransitionTime"] == "2026-05-01T12:05:00Z"
    assert flipped[0]["observedGeneration"] == 2


def test_status_patch_never_carries_trainer_fields():
    current = {"phase": "Running", "progress": {"step": 1}}
    desired = {"phase": "Running", "progress": {"step": 0}, "artifacts": [], "readyNodes": "2/2"}
    assert status.status_patch(current, desired) == {"readyNodes": "2/2"}


def test_pod_view_reads_exit_code_reason_and_disruption():
    body = {
        "metadata": {
            "name": "cats-node-1", "creationTimestamp": "2026-05-01T11:00:00Z",
            "labels": {contract.LABEL_RANK: "1", contract.LABEL_ATTEMPT: "3"},
            "ownerReferences": [{"uid": UID, "controller": True}],
        },
        "spec": {"nodeName": "localnode-0"},
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "DisruptionTarget", "status": "True"}],
            "containerStatuses": [{"name": contract.TRAINER_CONTAINER, "state": {
                "terminated": {"exitCode": 137, "reason": "OOMKilled"}}}],
        },
    }
    view = pods.from_body(body)
    assert (view.rank, view.attempt, view.owner_uid, view.exit_code, view.reason) == (1, 3, UID, 137, "OOMKilled")
    assert view.disrupted and view.node_name == "localnode-0" and not view.deleting
    assert view.created_at == dt.datetime(2026, 5, 1, 11, 0, tzinfo=dt.timezone.utc)


def test_pods_without_our_labels_are_not_indexed():
    assert pods.from_body({"metadata": {"name": "x", "labels": {contract.LABEL_RANK: "one"}}}) is None


def test_bounded_keeps_head_and_tail_and_says_what_was_cut():
    assert status.bounded("short") == "short"
    text = "HEAD" + "x" * 100_000 + "TAIL"
    cut = status.bounded(text, 1000)
    assert len(cut) <= 1000 and cut.startswith("HEAD") and cut.endswith("TAIL")
    marker = re.search(r" \[\.\.\. (\d+) characters cut \.\.\.\] ", cut)
    assert marker and len(cut) - len(marker.group(0)) + int(marker.group(1)) == len(text)
    assert all(len(status.bounded("y" * n, 300)) <= 300 for n in (299, 300, 301, 10_000))
