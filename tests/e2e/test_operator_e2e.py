"""The operator on a real cluster: jobs run the real trainer in process-node pods.

Each test applies a LoRATrainingJob the way a user would and checks what a user would check:
`kubectl get ltj`, the job's status and Events, the pods and the Service, and the LoRA on disk.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from metrics_watch import MetricsWatch
from safetensors import safe_open

from lorakube import builders, rbac
from lorakube_api import contract
from lorakube_dev import sandbox
from lorakube.spec import JobRef, parse_job

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

JOB_TIMEOUT = 600


def quickstart(data_dir: Path, name: str, steps: int = 8) -> dict:
    job = sandbox.quickstart_job(data_dir, name, training={"stepsPerEpoch": steps, "checkpointEverySteps": 2})
    # The quickstart reports progress every second, so a short run shows it moving.
    env = {e["name"]: e.get("value") for e in job["spec"]["resources"]["env"]}
    assert env[contract.ENV_PROGRESS_INTERVAL] == "1"
    return job


def kubectl_json(local_cluster, *args: str) -> dict:
    return json.loads(local_cluster.kubectl(*args, "-o", "json", check=True).stdout)


def job_children(local_cluster, namespace: str, name: str) -> tuple[list[dict], list[dict]]:
    selector = f"{contract.LABEL_JOB_NAME}={name}"
    pods = kubectl_json(local_cluster, "get", "pods", "-n", namespace, "-l", selector)["items"]
    services = kubectl_json(local_cluster, "get", "services", "-n", namespace, "-l", selector)["items"]
    return pods, services


def event_reasons(local_cluster, namespace: str, name: str) -> list[str]:
    events = kubectl_json(local_cluster, "get", "events", "-n", namespace,
                          "--field-selector", f"involvedObject.kind={contract.KIND},involvedObject.name={name}")
    return [e["reason"] for e in events["items"]]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def test_quickstart_runs_two_pods_to_succeeded_with_progress(local_cluster, job_namespace, data_dir,
                                                              start_operator):
    operator = start_operator()
    name = "quickstart"
    # The operator's and rank 0's /metrics are scraped while this job runs (metrics_watch.py).
    metrics = MetricsWatch(local_cluster, operator, job_namespace, name)
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, quickstart(data_dir, name))

    seen: list[dict] = []
    final = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, name, JOB_TIMEOUT,
                           on_change=lambda status: (seen.append(status), metrics.on_status(status)), interval=0.3)
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["readyNodes"] == "2/2" and status["attempt"] == 1 and status["restarts"] == 0
    assert [n["exitCode"] for n in status["nodes"]] == [0, 0]
    assert status["startTime"] <= status["completionTime"]
    metrics.check(total_steps=8)

    # progress moved while the job ran: an intermediate step was visible in status
    running_steps = {s["progress"]["step"] for s in seen if s.get("phase") == "Running" and s.get("progress")}
    assert any(step < status["progress"]["totalSteps"] for step in running_steps), seen
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 8
    assert status["progress"]["text"] == "8/8"

    # the LoRA is where spec.output.uri says (the hostPath volume maps /data to data_dir)
    lora = data_dir / "output" / name / contract.ARTIFACT_LORA_DIFFUSERS
    assert lora.is_file()
    with safe_open(str(lora), "pt") as weights:
        keys = list(weights.keys())
    assert keys and all("lora" in key for key in keys)
    # ... and status.artifacts says so, with a checksum that matches the file on disk
    published = {Path(a["uri"]).name: a for a in status["artifacts"]}
    assert published[lora.name]["uri"] == f"/data/output/{name}/{lora.name}"
    assert published[lora.name]["format"] == "diffusers"
    assert published[lora.name]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert published[lora.name]["bytes"] == lora.stat().st_size
    assert {contract.ARTIFACT_LORA_COMFYUI, contract.ARTIFACT_VALIDATION_GRID, contract.ARTIFACT_MANIFEST} <= set(published)

    # nothing was applied by hand: the pods ran as the job's own account, which the operator made
    # (progress and artifacts above came through it)
    pods, _ = job_children(local_cluster, job_namespace, name)
    assert {p["spec"]["serviceAccountName"] for p in pods} == {f"{name}-trainer"}
    # ... and only rank 0 got a token volume from the ServiceAccount admission plugin
    token_volumes = {p["metadata"]["name"]: [v["name"] for v in p["spec"].get("volumes", [])
                                             if "serviceAccountToken" in json.dumps(v.get("projected", {}))]
                     for p in pods}
    assert len(token_volumes[f"{name}-node-0"]) == 1 and token_volumes[f"{name}-node-1"] == [], token_volumes
    local_cluster.kubectl("get", "serviceaccount,role,rolebinding", f"{name}-trainer", "-n", job_namespace,
                          check=True)

    # both ranks rendezvoused through the injected env: rank 1 reached rank 0 by its DNS name
    rank1_log = local_cluster.kubectl("logs", "quickstart-node-1", "-n", job_namespace, check=True).stdout
    assert contract.master_addr(name, job_namespace) in rank1_log

    table = local_cluster.kubectl("get", "ltj", "-n", job_namespace, check=True).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "NODES", "PROGRESS", "LOSS", "ATTEMPT", "AGE"]
    row = table[1].split()
    assert row[:4] == [name, "Succeeded", "2/2", "8/8"] and row[5] == "1"
    float(row[4])  # the loss column holds a number

    reasons = event_reasons(local_cluster, job_namespace, name)
    assert {"PodsCreated", "AllPodsRunning", "AllPodsSucceeded"} <= set(reasons)
    # finished: Kopf removes its finalizer (one watch event after the Succeeded write, which the
    # poll above may catch first), so deleting the job never waits for the operator
    wait_for(lambda: not (sandbox.get_job(local_cluster.cluster.kubectl, job_namespace, name) or {})
             .get("metadata", {}).get("finalizers"), 30, "the operator's finalizer to leave the finished job")


# slow: ~25 s; `make test` keeps one create per pod counted in the audit log (test_operator_api_cost_e2e.py), and the chaos test SIGKILLs the operator 10 times in the slow tier too
@pytest.mark.slow
def test_operator_killed_during_pod_creation_creates_nothing_twice(local_cluster, job_namespace, data_dir,
                                                                   start_operator):
    name = "crashy"
    kubectl = local_cluster.cluster.kubectl
    sandbox.apply_job(kubectl, job_namespace, quickstart(data_dir, name))
    body = sandbox.get_job(kubectl, job_namespace, name)
    job = JobRef(name=name, namespace=job_namespace, uid=body["metadata"]["uid"])

    # What an operator that died after its first creates leaves behind: the trainer's account,
    # Role and RoleBinding, the Service and rank 0.
    spec = parse_job(name, body["spec"])
    leftovers = [*rbac.build_trainer_access(spec, job), builders.build_service(job),
                 builders.build_pod(spec, job, 1, 0, builders.OperatorConfig())]
    local_cluster.apply(leftovers, namespace=job_namespace)
    pod0_uid = kubectl_json(local_cluster, "get", "pod", f"{name}-node-0", "-n", job_namespace)["metadata"]["uid"]

    # A fresh operator adopts them; it is SIGKILLed as soon as it has created the missing pod.
    first = start_operator()
    wait_for(lambda: len(job_children(local_cluster, job_namespace, name)[0]) >= 2, 60, "the missing pod")
    first.kill()
    start_operator()

    final = sandbox.follow(kubectl, job_namespace, name, JOB_TIMEOUT)
    assert final["status"]["phase"] == "Succeeded", json.dumps(final["status"], indent=1)
    assert final["status"]["attempt"] == 1 and final["status"]["restarts"] == 0
    pods, services = job_children(local_cluster, job_namespace, name)
    assert sorted(p["metadata"]["name"] for p in pods) == [f"{name}-node-0", f"{name}-node-1"]
    assert [s["metadata"]["name"] for s in services] == [name]
    adopted = next(p for p in pods if p["metadata"]["name"] == f"{name}-node-0")
    assert adopted["metadata"]["uid"] == pod0_uid  # adopted, never recreated


def test_deleting_a_job_removes_its_pods_and_service(local_cluster, job_namespace, data_dir, start_operator):
    start_operator()
    name = "short-lived"
    kubectl = local_cluster.cluster.kubectl
    sandbox.apply_job(kubectl, job_namespace, quickstart(data_dir, name, steps=200))
    wait_for(lambda: (sandbox.get_job(kubectl, job_namespace, name) or {}).get("status", {}).get("phase")
             == "Running", 120, "the job to run")
    pods, services = job_children(local_cluster, job_namespace, name)
    assert len(pods) == 2 and len(services) == 1

    local_cluster.kubectl("delete", "ltj", name, "-n", job_namespace, "--wait=true", "--timeout=60s", check=True)
    wait_for(lambda: job_children(local_cluster, job_namespace, name) == ([], []), 90,
             "garbage collection of the pods and the Service")


def test_a_missing_dataset_fails_the_job_with_the_pod_exit_code_and_log_tail(local_cluster, job_namespace, data_dir,
                                                                        start_operator):
    start_operator()
    name = "bad-data"
    job = quickstart(data_dir, name)
    job["spec"]["dataset"]["uri"] = "/data/no-such-dataset"
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)

    final = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, name, JOB_TIMEOUT)
    status = final["status"]
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    # Preflight finds the missing dataset before any model loads, and names the check.
    assert failed["status"] == "True" and failed["reason"] == contract.PREFLIGHT_FAILED
    assert failed["message"].startswith("PreflightFailed: dataset not readable: /data/no-such-dataset")
    failure = status["lastFailure"]
    assert failure["pod"].startswith(f"{name}-node-")
    assert failure["exitCode"] == contract.EXIT_PREFLIGHT_DATASET
    assert "no-such-dataset" in failure["logTail"]
    # The log's text, line by line, as `kubectl logs` shows it (not a repr of the bytes).
    assert not failure["logTail"].startswith(("b'", 'b"')) and "\\n" not in failure["logTail"]
    assert status["restarts"] == 0
    assert contract.PREFLIGHT_FAILED in event_reasons(local_cluster, job_namespace, name)


def test_a_pod_deleted_mid_run_restarts_the_gang_which_resumes(local_cluster, job_namespace, data_dir,
                                                                start_operator):
    start_operator()
    name = "resumer"
    kubectl = local_cluster.cluster.kubectl
    job = quickstart(data_dir, name, steps=24)
    # No periodic checkpoint before the last step: the one attempt 2 resumes from can only be the
    # one the gang wrote on SIGTERM (the node's delete of pod 1), at the step they agreed on.
    job["spec"]["training"]["checkpointEverySteps"] = 1000
    sandbox.apply_job(kubectl, job_namespace, job)

    def stepping():
        status = (sandbox.get_job(kubectl, job_namespace, name) or {}).get("status", {})
        step = (status.get("progress") or {}).get("step", 0)
        return status.get("phase") == "Running" and step >= 4 and step
    seen = wait_for(stepping, 300, "a few steps of attempt 1")
    local_cluster.kubectl("delete", "pod", f"{name}-node-1", "-n", job_namespace, "--wait=false", check=True)

    final = sandbox.follow(kubectl, job_namespace, name, JOB_TIMEOUT)
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["attempt"] == 2 and status["restarts"] == 1
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert restarting["status"] == "False"  # over: attempt 2 was created and ran
    reasons = set(event_reasons(local_cluster, job_namespace, name))
    assert reasons & {"PodDeleted", "PodLost", "KilledBySignal", "RetryableExit", "PodDisrupted"}, reasons
    pods, _ = job_children(local_cluster, job_namespace, name)
    assert {p["metadata"]["labels"][contract.LABEL_ATTEMPT] for p in pods} == {"2"}
    log = local_cluster.kubectl("logs", f"{name}-node-0", "-n", job_namespace, check=True).stdout
    resumed = re.search(r"resuming from \S+ \(step (\d+) of 24\)", log)
    assert resumed, log[-3000:]
    # Zero lost steps: attempt 2 starts right after a step attempt 1 reached after the deletion.
    stopped = int(resumed.group(1))
    assert seen <= stopped < 24
    metrics = data_dir / "output" / name / contract.ARTIFACT_METRICS
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 25))
    tail = status.get("lastFailure", {}).get("logTail") or ""
    if "stopped after SIGTERM" in tail:         # the failed pod's last words, when the operator kept them
        assert f"the next attempt resumes at step {stopped + 1}" in tail, tail


@pytest.mark.slow     # about a minute on 2 cores; `make test-slow` runs it
def test_a_z_image_job_runs_through_the_operator(local_cluster, job_namespace, data_dir, start_operator):
    """A family beyond the original four, end to end: the tiny Z-Image pipeline (Qwen3 text encoder,
    list-form transformer) trains in two pods on a non-square size and publishes both LoRA files."""
    model = data_dir / "model-z-image"
    if not (model / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "lorakube_dev.tiny", "--family", "z-image", "--out", str(model)],
                       check=True, capture_output=True)
    start_operator()
    name = "z-image"
    job = sandbox.quickstart_job(data_dir, name, model={"family": "z-image", "uri": "/data/model-z-image"},
                                 training={"stepsPerEpoch": 3, "height": 64, "width": 96})
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    final = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, name, JOB_TIMEOUT, interval=0.5)
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["progress"]["step"] == 3
    published = {Path(a["uri"]).name: a for a in status["artifacts"]}
    assert {contract.ARTIFACT_LORA_DIFFUSERS, contract.ARTIFACT_LORA_COMFYUI} <= set(published)
    with safe_open(str(data_dir / "output" / name / contract.ARTIFACT_LORA_DIFFUSERS), "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(k.startswith("transformer.layers.") for k in keys), keys[:5]
