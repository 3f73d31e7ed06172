"""failures.classify on the pods a multi-process trainer pod and a CUDA OOM leave behind, and what
decide() then does with the job."""

from __future__ import annotations

import pytest
from ltj_fixtures import pod_view
from test_reconcile import CONFIG, condition, observe, running_status

from lorakube import failures
from lorakube_api import contract
from lorakube.reconcile import decide

# The last lines the trainer's launcher prints when local rank 1 of a 2-process pod hit a corrupt
# image (the pod's termination message under FallbackToLogsOnError).
RANK1_DATASET_TAIL = ("lorakube-train: error: dataset: cats-7.jpg: cannot decode image (image file is truncated); "
                      "replace or remove it\n"
                      "lorakube-train: error: local rank 1 (global rank 1) exited with code 65: dataset: cats-7.jpg: "
                      "cannot decode image (image file is truncated); replace or remove it\n")


def test_a_dataset_error_on_another_local_rank_fails_at_once_naming_the_file(job_spec):
    pod = pod_view(0, "Failed", exit_code=contract.EXIT_DATASET_ERROR, reason="Error", message=RANK1_DATASET_TAIL)
    failure = failures.classify(pod)
    assert failure.rule.reason == "InvalidDataset" and failure.rule.action is failures.Action.FAIL

    patch = decide(observe(job_spec, running_status(), [pod, pod_view(1, "Running"), pod_view(2, "Running")]),
                   CONFIG).status_patch
    assert patch["phase"] == "Failed" and "restarts" not in patch
    assert condition(patch, "Failed")["reason"] == "InvalidDataset"
    assert condition(patch, "Failed")["message"].startswith(
        "dataset: cats-7.jpg: cannot decode image (image file is truncated); replace or remove it (pod cats-node-0")
    assert "local rank 1" in patch["lastFailure"]["message"]
    assert patch["lastFailure"]["exitCode"] == contract.EXIT_DATASET_ERROR


def test_a_dataset_refused_by_preflight_quotes_the_row_in_the_condition(job_spec):
    tail = ("PreflightFailed: dataset: metadata.csv row 3: image 'b.png' not found in /data/cats/train\n"
            "lorakube-train: error: PreflightFailed: dataset: metadata.csv row 3: image 'b.png' not found in "
            "/data/cats/train\n")
    pod = pod_view(0, "Failed", exit_code=contract.EXIT_DATASET_ERROR, reason="Error", message=tail)
    patch = decide(observe(job_spec, running_status(), [pod, pod_view(1, "Running"), pod_view(2, "Running")]),
                   CONFIG).status_patch
    assert patch["phase"] == "Failed" and condition(patch, "Failed")["reason"] == "InvalidDataset"
    assert condition(patch, "Failed")["message"] == (
        "dataset: metadata.csv row 3: image 'b.png' not found in /data/cats/train (pod cats-node-0, rank 0, "
        "exit code 65)")


def test_cuda_out_of_memory_fails_at_once_with_its_own_reason_and_a_hint(job_spec):
    pod = pod_view(1, "Failed", exit_code=contract.EXIT_OUT_OF_MEMORY, reason="Error")
    failure = failures.classify(pod)
    assert failure.rule.reason == "OutOfMemory" and failure.rule.action is failures.Action.FAIL
    for field in ("spec.training.batchSize", "spec.training.gradientCheckpointing", "spec.training.strategy",
                  "deepspeed_stage_3"):
        assert field in failure.message

    patch = decide(observe(job_spec, running_status(), [pod_view(0, "Running"), pod, pod_view(2, "Running")]),
                   CONFIG).status_patch
    assert patch["phase"] == "Failed" and "restarts" not in patch
    assert condition(patch, "Failed")["reason"] == "OutOfMemory"
    assert "spec.training.batchSize" in condition(patch, "Failed")["message"]


@pytest.mark.parametrize(("code", "reason"), [(contract.EXIT_RETRYABLE, "RetryableExit"), (137, "KilledBySignal"),
                                              (143, "KilledBySignal")])
def test_an_out_of_memory_pod_beats_a_retryable_one_in_the_same_pass(job_spec, code, reason):
    assert failures.classify(pod_view(0, "Failed", exit_code=code)).rule.reason == reason
    pods = [pod_view(0, "Failed", exit_code=code), pod_view(1, "Failed", exit_code=contract.EXIT_OUT_OF_MEMORY),
            pod_view(2, "Running")]
    patch = decide(observe(job_spec, running_status(), pods), CONFIG).status_patch
    assert patch["phase"] == "Failed" and patch["lastFailure"]["pod"] == "cats-node-1"
    assert patch["lastFailure"]["reason"] == "OutOfMemory"


# The log tail a pod leaves when preflight finds its output folder read-only (the trainer prints the
# line on stdout, then once more as its error; the termination message is the tail of the log).
PREFLIGHT_TAIL = ("2026-01-01 00:00:00 INFO lorakube_trainer: starting\n"
                  "PreflightFailed: output not writable: /data/out (Read-only file system; uid 1000)\n"
                  "lorakube-train: error: PreflightFailed: output not writable: /data/out (Read-only file system; "
                  "uid 1000)\n")


@pytest.mark.parametrize("code", sorted(set(contract.PREFLIGHT_EXIT_CODES) - contract.PREFLIGHT_RETRYABLE_EXIT_CODES))
def test_a_failed_preflight_check_fails_the_job_at_once_naming_the_check(job_spec, code):
    pod = pod_view(0, "Failed", exit_code=code, reason="Error", message=PREFLIGHT_TAIL)
    failure = failures.classify(pod)
    assert failure.rule.reason == "PreflightFailed" and failure.rule.action is failures.Action.FAIL
    assert failure.message == ("PreflightFailed: output not writable: /data/out (Read-only file system; uid 1000) "
                               f"(pod cats-node-0, rank 0, exit code {code})")

    patch = decide(observe(job_spec, running_status(), [pod, pod_view(1, "Running"), pod_view(2, "Running")]),
                   CONFIG).status_patch
    assert patch["phase"] == "Failed" and "restarts" not in patch
    failed = condition(patch, "Failed")
    assert failed["reason"] == "PreflightFailed"
    assert failed["message"].startswith("PreflightFailed: output not writable: /data/out (Read-only file system")


def test_a_preflight_failure_without_its_line_still_names_the_check_by_code():
    failure = failures.classify(pod_view(1, "Failed", exit_code=contract.EXIT_PREFLIGHT_GPUS, reason="Error"))
    assert failure.rule.reason == "PreflightFailed"
    assert failure.message.startswith("pod cats-node-1 (rank 1) failed a preflight check before training")
    assert "84 gpus" in failure.message and "exit code 84" in failure.message


def test_a_master_that_does_not_resolve_yet_restarts_the_gang(job_spec):
    line = "PreflightFailed: master not resolvable: cats-node-0.cats.ns.svc (Name or service not known; waited 30 s)"
    pod = pod_view(2, "Failed", exit_code=contract.EXIT_PREFLIGHT_MASTER, reason="Error",
                   message=f"lorakube-train: error: {line}\n")
    assert failures.classify(pod).rule.action is failures.Action.RESTART
    patch = decide(observe(job_spec, running_status(), [pod_view(0, "Running"), pod_view(1, "Running"), pod]),
                   CONFIG).status_patch
    assert patch["phase"] == "Restarting" and patch["restarts"] == 1
    restarting = condition(patch, "Restarting")
    assert restarting["reason"] == "PreflightFailed" and restarting["message"].startswith(line)


def test_a_fatal_preflight_failure_beats_a_retryable_one_in_the_same_pass(job_spec):
    pods = [pod_view(0, "Failed", exit_code=contract.EXIT_PREFLIGHT_MASTER),
            pod_view(1, "Failed", exit_code=contract.EXIT_PREFLIGHT_DATASET, message=(
                "PreflightFailed: dataset not readable: /data/ds (no metadata.csv in /data/ds: ...)")),
            pod_view(2, "Running")]
    patch = decide(observe(job_spec, running_status(), pods), CONFIG).status_patch
    assert patch["phase"] == "Failed" and patch["lastFailure"]["pod"] == "cats-node-1"
    assert condition(patch, "Failed")["message"].startswith("PreflightFailed: dataset not readable: /data/ds")
