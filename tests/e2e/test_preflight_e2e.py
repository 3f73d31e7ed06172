"""Preflight on a real cluster: a job whose output folder sits on a read-only mount, or whose model
path holds no pipeline, fails within seconds with the check named, and no training step ran (no
progress, no metrics.jsonl). (The missing dataset is test_operator_e2e.py's bad-data job.)"""

from __future__ import annotations

import time

import pytest

from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

# Pod start on the process node plus one preflight (well under a second) plus the operator's pass;
# a job that loaded the model and trained would take far longer on these CPUs.
FAIL_WITHIN_SECONDS = 30


def test_an_unwritable_output_fails_the_job_in_seconds_before_any_training_step(local_cluster, job_namespace,
                                                                               data_dir, start_operator):
    start_operator()
    name = "ro-output"
    job = sandbox.quickstart_job(data_dir, name, training={"stepsPerEpoch": 4})
    # The same host folder, mounted a second time read-only: what a user gets from a read-only PVC.
    job["spec"]["resources"]["volumeMounts"].append({"name": "data", "mountPath": "/ro", "readOnly": True})
    job["spec"]["output"]["uri"] = f"/ro/output/{name}"
    kubectl = local_cluster.cluster.kubectl
    started = time.monotonic()
    sandbox.apply_job(kubectl, job_namespace, job)

    final = sandbox.follow(kubectl, job_namespace, name, FAIL_WITHIN_SECONDS, interval=0.5)
    seconds = time.monotonic() - started
    status = final["status"]
    print(f"job Failed {seconds:.1f} s after it was applied")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == contract.PREFLIGHT_FAILED
    assert failed["message"].startswith(f"PreflightFailed: output not writable: /ro/output/{name} "
                                        "(Read-only file system"), failed["message"]
    assert status["lastFailure"]["exitCode"] == contract.EXIT_PREFLIGHT_OUTPUT
    assert status.get("restarts", 0) == 0
    # No training step: no progress was ever reported, and nothing was written where the output goes.
    assert not (status.get("progress") or {}).get("step")
    assert not (data_dir / "output" / name).exists()
    assert not list((data_dir / "output").glob(f"{name}*/{contract.ARTIFACT_METRICS}"))


def test_a_model_path_that_is_not_a_pipeline_fails_the_job_naming_the_model(local_cluster, job_namespace, data_dir,
                                                                             start_operator):
    start_operator()
    name = "not-a-model"
    job = sandbox.quickstart_job(data_dir, name, training={"stepsPerEpoch": 4})
    job["spec"]["model"]["uri"] = "/data/dataset"       # exists and is readable, but holds no model_index.json
    kubectl = local_cluster.cluster.kubectl
    sandbox.apply_job(kubectl, job_namespace, job)

    status = sandbox.follow(kubectl, job_namespace, name, FAIL_WITHIN_SECONDS, interval=0.5)["status"]
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == contract.PREFLIGHT_FAILED
    assert failed["message"].startswith("PreflightFailed: model not usable: /data/dataset ("), failed["message"]
    assert "has no model_index.json" in failed["message"]
    assert status["lastFailure"]["exitCode"] == contract.EXIT_PREFLIGHT_MODEL
    assert not (status.get("progress") or {}).get("step")
    assert not (data_dir / "output" / name).exists()


def test_a_hostile_dataset_fails_the_job_as_invalid_dataset_naming_the_row(local_cluster, job_namespace, data_dir,
                                                                            start_operator):
    """A metadata.jsonl row reaching out of the dataset folder: refused by preflight in seconds, the
    row named in the job's condition; spec.dataset.format and defaultCaption reach the trainer."""
    start_operator()
    name = "hostile-data"
    folder = data_dir / name / "train"
    folder.mkdir(parents=True)
    for image in (data_dir / "dataset" / "train").glob("*.png"):
        (folder / image.name).write_bytes(image.read_bytes())
    first = sorted(folder.glob("*.png"))[0].name
    (folder / "metadata.jsonl").write_text(f'{{"file_name": "{first}"}}\n{{"file_name": "../../output/x.png"}}\n')
    job = sandbox.quickstart_job(data_dir, name, training={"stepsPerEpoch": 4})
    job["spec"]["dataset"].update(uri=f"/data/{name}", format="jsonl", defaultCaption="a shape")
    kubectl = local_cluster.cluster.kubectl
    sandbox.apply_job(kubectl, job_namespace, job)

    status = sandbox.follow(kubectl, job_namespace, name, FAIL_WITHIN_SECONDS, interval=0.5)["status"]
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidDataset"
    # Line 1 passed with the default caption; line 2 is the one named.
    assert failed["message"].startswith("dataset: metadata.jsonl line 2: file_name '../../output/x.png' points "
                                        "outside the dataset folder"), failed["message"]
    assert status["lastFailure"]["exitCode"] == contract.EXIT_DATASET_ERROR
    assert status.get("restarts", 0) == 0
    assert not (status.get("progress") or {}).get("step")
    assert not (data_dir / "output" / name).exists()
