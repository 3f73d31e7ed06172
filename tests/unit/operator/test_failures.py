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


def test_a_dataset_error_on_another_local_rank_is_a_user_error_that_fails_at_once(job_spec):
    pod = pod_view(0, "Failed", exit_code=contract.EXIT_DATASET_ERROR, reason="Error", message=RANK1_DATASET_TAIL)
    failure = failures.classify(pod)
    assert failure.rule.reason == "UserError" and failure.rule.action is failures.Action.FAIL

    patch = decide(observe(job_spec, running_status(), [pod, pod_view(1, "Running"), pod_view(2, "Running")]),
                   CONFIG).status_patch
    assert patch["phase"] == "Failed" and "restarts" not in patch
    assert condition(patch, "Failed")["reason"] == "UserError"
    assert "local rank 1" in patch["lastFailure"]["message"]
    assert patch["lastFailure"]["exitCode"] == contract.EXIT_DATASET_ERROR


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
