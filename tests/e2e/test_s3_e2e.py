"""Jobs with no shared volume, through the operator: model and dataset read from one real S3 server
(versitygw on the node bridge's address), checkpoints and the LoRA written to another with other
credentials, each URI with its own section's Secret.

- two nodes, inputs and output on different servers with different keys: the job succeeds, the
  manifest's sha256 values are the objects', and no Secret's value shows anywhere (make test);
- an output bucket that refuses writes fails the job before training, naming the URI (make test);
- slow: the output server stopped during the final upload and started again; a node killed mid-run,
  the new gang resuming from the bucket with the LoRA of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from test_operator_chaos_e2e import training

from localcluster.pytest_plugin import wait_for
from localcluster.recorder import WatchRecorder
from localcluster.s3server import S3Server
from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

JOB_TIMEOUT = 600
# Pod start, one preflight (a probe object refused) and the operator's pass; no model is loaded.
FAIL_WITHIN_SECONDS = 60
INPUTS_SECRET, OUTPUT_SECRET = "inputs-creds", "loras-creds"
MODEL_URI, DATASET_URI = "s3://models/tiny-flux", "s3://datasets/shapes"


def _upload_folder(fs, local: Path, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{prefix}/{path.relative_to(local).as_posix()}")


def _secret(local_cluster, namespace: str, name: str, server: S3Server) -> None:
    """A Secret with everything a client of `server` needs: its keys and its endpoint."""
    data = {k: base64.b64encode(v.encode()).decode() for k, v in server.client_env().items()}
    local_cluster.kubectl("apply", "-n", namespace, "-f", "-", check=True, input=json.dumps(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}))


def _servers(local_cluster, namespace: str, start_bridge_s3, data_dir: Path,
             read_only_output: bool = False) -> tuple[S3Server, S3Server]:
    """The inputs' server (model + dataset) and the outputs' server, each with its own root keys,
    and a Secret for each (the outputs' one pointing at a read-only gateway if asked)."""
    inputs, outputs = start_bridge_s3("inputs"), start_bridge_s3("outputs")
    fs = inputs.filesystem()
    inputs.create_bucket("models")
    inputs.create_bucket("datasets")
    _upload_folder(fs, data_dir / "model", "models/tiny-flux")
    _upload_folder(fs, data_dir / "dataset", "datasets/shapes")
    outputs.create_bucket("loras")
    assert inputs.secret_key != outputs.secret_key and inputs.access_key != outputs.access_key
    _secret(local_cluster, namespace, INPUTS_SECRET, inputs)
    writer = start_bridge_s3("outputs-read-only", like=outputs, read_only=True) if read_only_output else outputs
    _secret(local_cluster, namespace, OUTPUT_SECRET, writer)
    return inputs, outputs


def _s3_job(data_dir: Path, name: str, nodes: int = 2, **training_values: Any) -> dict[str, Any]:
    job = sandbox.quickstart_job(data_dir, name, training=training_values)
    spec = job["spec"]
    spec["model"].update(uri=MODEL_URI, secretRef={"name": INPUTS_SECRET})
    spec["dataset"].update(uri=DATASET_URI, secretRef={"name": INPUTS_SECRET})
    spec["output"].update(uri=f"s3://loras/{name}", secretRef={"name": OUTPUT_SECRET})
    spec["resources"]["numNodes"] = nodes
    # No shared volume: each pod gets its own empty cache folder.
    spec["resources"]["volumes"] = [{"name": "cache", "emptyDir": {}}]
    spec["resources"]["volumeMounts"] = [{"name": "cache", "mountPath": "/cache"}]
    spec["resources"]["env"].append({"name": "LORAKUBE_CACHE_DIR", "value": "/cache"})
    return job


def _pods(local_cluster, namespace: str) -> list[dict[str, Any]]:
    return json.loads(local_cluster.kubectl("get", "pods", "-n", namespace, "-o", "json", check=True).stdout)["items"]


def _logs(local_cluster, namespace: str, pods: list[dict[str, Any]]) -> dict[str, str]:
    return {p["metadata"]["name"]: local_cluster.kubectl("logs", p["metadata"]["name"], "-n", namespace).stdout
            for p in pods}


def _verified_artifacts(outputs: S3Server, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """status.artifacts are the bucket's objects, with their own sha256 and sizes; the manifest's
    entries match. Returns the manifest."""
    fs = outputs.filesystem()
    published = {a["uri"].rsplit("/", 1)[-1]: a for a in status["artifacts"]}
    assert {contract.ARTIFACT_LORA_DIFFUSERS, contract.ARTIFACT_MANIFEST} <= set(published)
    manifest = json.loads(fs.cat_file(f"loras/{name}/{contract.ARTIFACT_MANIFEST}"))
    for file_name, entry in published.items():
        assert entry["uri"] == f"s3://loras/{name}/{file_name}"
        body = fs.cat_file(f"loras/{name}/{file_name}")
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (entry["sha256"], entry["bytes"]), file_name
        if file_name != contract.ARTIFACT_MANIFEST:
            assert manifest["files"][file_name] == {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    return manifest


def _assert_secrets_nowhere(local_cluster, namespace: str, secrets: list[str], texts: dict[str, str],
                            pods: list[dict[str, Any]], outputs: S3Server, prefix: str | None) -> None:
    """No Secret value in a log line (pods, operator), an Event, the job or its status, a pod's env
    `value`, or an object the job wrote (artifacts, training_config.json, model card, checkpoints)."""
    events = local_cluster.kubectl("get", "events", "-n", namespace, "-o", "json", check=True).stdout
    values = [e.get("value", "") for p in pods for c in p["spec"]["containers"] for e in c.get("env", [])]
    everything = {**texts, "events": events, "pods": json.dumps(pods), "env values": "\n".join(values)}
    fs = outputs.filesystem()
    objects = fs.find(prefix) if prefix else []
    assert prefix is None or any(o.endswith(contract.ARTIFACT_TRAINING_CONFIG) for o in objects) and \
        any(o.endswith(contract.ARTIFACT_MODEL_CARD) for o in objects), objects
    for secret in secrets:
        for where, text in everything.items():
            assert secret not in text, where
        for path in objects:
            assert secret.encode() not in fs.cat_file(path), path


def _tree_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _assert_staging_then_running(versions: list[dict], data_dir) -> None:
    """What a user watching the job sees: Staging (with the bytes of rank 0's inputs) before Running."""
    phases = [v["status"]["phase"] for v in versions if (v.get("status") or {}).get("phase")]
    seen = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert "Staging" in seen and seen.index("Staging") < seen.index("Running"), seen
    statuses = [v.get("status") or {} for v in versions]
    staging = [s["progress"]["staging"] for s in statuses
               if s.get("phase") == "Staging" and (s.get("progress") or {}).get("staging")]
    model = [r for r in staging if r["input"] == "model"]
    assert model and model[-1]["bytesTotal"] == _tree_bytes(data_dir / "model"), staging
    reports = [(s.get("progress") or {}).get("staging") for s in statuses]
    final = [r for r in reports if r][-1]
    # one report per moment: training found the inputs its pod's first process staged and said nothing more
    assert (final["input"], final["complete"], final["attempt"], final["cached"]) == ("dataset", True, 1, False)
    assert final["bytesDone"] == final["bytesTotal"] == _tree_bytes(data_dir / "dataset")


def test_a_two_node_job_reads_from_one_s3_server_and_writes_to_another_each_uri_with_its_own_secret(
        local_cluster, job_namespace, data_dir, start_operator, start_bridge_s3, tmp_path):
    inputs, outputs = _servers(local_cluster, job_namespace, start_bridge_s3, data_dir)
    name = "s3job"
    job = _s3_job(data_dir, name, stepsPerEpoch=4, checkpointEverySteps=2)
    operator = start_operator()
    watch = WatchRecorder(local_cluster.kubectl_path, local_cluster.kubeconfig,
                          f"{contract.PLURAL}.{contract.API_GROUP}", job_namespace, tmp_path / "watch", {})
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    try:
        final = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, name, JOB_TIMEOUT, interval=0.5)
    finally:
        watch.stop()
    status = final["status"]
    pods = _pods(local_cluster, job_namespace)
    logs = _logs(local_cluster, job_namespace, pods)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + "\n".join(v[-3000:] for v in logs.values())
    _assert_staging_then_running([json.loads(p.read_text()) for p in watch.written], data_dir)

    # Each URI was read or written with its own section's credentials: the inputs' keys are not
    # valid on the outputs' server and the other way round, and each Secret names its own endpoint.
    _verified_artifacts(outputs, name, status)
    assert inputs.count("GetObject") > 0
    fs = outputs.filesystem()
    # checkpoints reached the bucket, with the rank-1 RNG file that came from the other pod's cache
    marker = json.loads(fs.cat_file(f"loras/{name}/checkpoints/step-000000004/{contract.CHECKPOINT_COMPLETE_MARKER}"))
    assert "rng-rank-00001.pt" in marker["files"]

    # No pod mounted a shared volume; each Secret reached the pods by reference, under its section's prefix.
    for pod in pods:
        assert all("hostPath" not in v and "persistentVolumeClaim" not in v for v in pod["spec"].get("volumes", []))
        assert pod["spec"]["containers"][0]["envFrom"] == [
            {"prefix": "LORAKUBE_MODEL_", "secretRef": {"name": INPUTS_SECRET}},
            {"prefix": "LORAKUBE_DATASET_", "secretRef": {"name": INPUTS_SECRET}},
            {"prefix": "LORAKUBE_OUTPUT_", "secretRef": {"name": OUTPUT_SECRET}}]
    _assert_secrets_nowhere(local_cluster, job_namespace, [inputs.secret_key, outputs.secret_key],
                            {**logs, "operator log": operator.log_text(), "job": json.dumps(final)},
                            pods, outputs, f"loras/{name}")


def test_an_output_bucket_that_refuses_writes_fails_the_job_before_training_naming_the_uri(
        local_cluster, job_namespace, data_dir, start_operator, start_bridge_s3):
    inputs, outputs = _servers(local_cluster, job_namespace, start_bridge_s3, data_dir, read_only_output=True)
    name = "denied"
    job = _s3_job(data_dir, name, nodes=1, stepsPerEpoch=4)
    operator = start_operator()
    started = time.monotonic()
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    final = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, name, FAIL_WITHIN_SECONDS, interval=0.5)
    print(f"job Failed {time.monotonic() - started:.1f} s after it was applied")
    status = final["status"]
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == contract.PREFLIGHT_FAILED
    assert failed["message"].startswith(f"PreflightFailed: output not writable: s3://loras/{name} "
                                        f"(cannot write to s3://loras/{name}: PermissionError"), failed["message"]
    assert "PutObject" in failed["message"]
    assert status["lastFailure"]["exitCode"] == contract.EXIT_PREFLIGHT_OUTPUT
    assert status.get("restarts", 0) == 0
    # Before training: no step reported, nothing read from the inputs, nothing written to the bucket.
    assert not (status.get("progress") or {}).get("step")
    assert inputs.count("GetObject") == 0
    assert not (outputs.root / "loras" / name).exists()
    pods = _pods(local_cluster, job_namespace)
    _assert_secrets_nowhere(local_cluster, job_namespace, [inputs.secret_key, outputs.secret_key],
                            {**_logs(local_cluster, job_namespace, pods), "operator log": operator.log_text(),
                             "job": json.dumps(final)}, pods, outputs, None)


def _is_artifact(path: Path, folder: Path) -> bool:
    """An object of the final upload (not a checkpoint, nor the metrics uploaded with each one)."""
    rel = path.relative_to(folder)
    return (path.is_file() and rel.parts[0] != contract.DEFAULT_CHECKPOINT_SUBDIR and not rel.name.startswith(".")
            and rel.name not in (contract.ARTIFACT_METRICS, contract.ARTIFACT_TIMINGS))


@pytest.mark.slow
def test_the_output_server_down_during_the_final_upload_delays_it_and_nothing_is_claimed_meanwhile(
        local_cluster, job_namespace, data_dir, start_operator, start_bridge_s3):
    inputs, outputs = _servers(local_cluster, job_namespace, start_bridge_s3, data_dir)
    name = "outage"
    job = _s3_job(data_dir, name, nodes=1, stepsPerEpoch=4, checkpointEverySteps=2)
    start_operator()
    kubectl = local_cluster.cluster.kubectl
    sandbox.apply_job(kubectl, job_namespace, job)
    folder = outputs.root / "loras" / name

    # The first artifact object lands (the model card sorts first): the server goes down at once.
    first = wait_for("the first artifact object", lambda: folder.is_dir() and next(
        (p for p in sorted(folder.rglob("*")) if _is_artifact(p, folder)), None), timeout=JOB_TIMEOUT, every=0.01)
    outputs.stop()
    print(f"server stopped after {first.name} arrived")
    down_until = time.monotonic() + 12
    while time.monotonic() < down_until:
        status = (sandbox.get_job(kubectl, job_namespace, name) or {}).get("status") or {}
        assert not (folder / contract.ARTIFACT_MANIFEST).exists()
        assert not status.get("artifacts"), status["artifacts"]
        assert status.get("phase") == "Running", status
        time.sleep(1)
    outputs.restart()

    final = sandbox.follow(kubectl, job_namespace, name, JOB_TIMEOUT, interval=0.5)
    status = final["status"]
    log = local_cluster.kubectl("logs", f"{name}-node-0", "-n", job_namespace).stdout
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + log[-3000:]
    assert status.get("restarts", 0) == 0
    # The outage hit the artifact upload itself (retried with backoff), which then completed.
    retried = [line for line in log.splitlines() if f"upload to s3://loras/{name}/" in line and "retry" in line]
    assert retried, log[-3000:]
    manifest = _verified_artifacts(outputs, name, status)
    assert set(manifest["files"]) | {contract.ARTIFACT_MANIFEST} == {a["uri"].rsplit("/", 1)[-1]
                                                                    for a in status["artifacts"]}


def _kill_pod_processes(namespace: str, pod: str) -> int:
    """SIGKILL every process of one pod (found by the env the operator gave it): the node is gone
    as far as the trainer is concerned, with no SIGTERM and no chance to write a checkpoint."""
    wanted = (f"{contract.ENV_POD_NAME}={pod}".encode(), f"{contract.ENV_JOB_NAMESPACE}={namespace}".encode())
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue       # gone meanwhile, or a kernel thread
        if all(item in environ for item in wanted):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass       # exited meanwhile: nothing left to kill
    return killed


def _complete_steps(outputs: S3Server, name: str) -> list[int]:
    root = outputs.root / "loras" / name / contract.DEFAULT_CHECKPOINT_SUBDIR
    return sorted(int(p.parent.name[len(contract.CHECKPOINT_DIR_PREFIX):])
                  for p in root.glob(f"{contract.CHECKPOINT_DIR_PREFIX}*/{contract.CHECKPOINT_COMPLETE_MARKER}"))


def _progress_steps(log: str) -> list[int]:
    steps = []
    for line in log.splitlines():
        if f'"event": "{contract.PROGRESS_EVENT}"' in line:
            steps.append(json.loads(line[line.index("{"):])["step"])
    return steps


@pytest.mark.slow
def test_a_node_killed_mid_run_the_new_gang_resumes_from_the_bucket_to_the_same_lora_bit_for_bit(
        local_cluster, job_namespace, data_dir, start_operator, start_bridge_s3):
    inputs, outputs = _servers(local_cluster, job_namespace, start_bridge_s3, data_dir)
    kubectl = local_cluster.cluster.kubectl
    total = 10
    jobs = {}
    for name in ("whole", "killed"):
        jobs[name] = _s3_job(data_dir, name, stepsPerEpoch=total, checkpointEverySteps=2)
        jobs[name]["spec"]["runPolicy"]["backoffSeconds"] = 1
        sandbox.apply_job(kubectl, job_namespace, jobs[name])
    start_operator()

    # Mid-run, with a complete checkpoint in the bucket: rank 1's node dies.
    wait_for("a checkpoint in the bucket and training under way",
             lambda: _complete_steps(outputs, "killed") and training(kubectl, job_namespace, "killed")
             and sandbox.get_job(kubectl, job_namespace, "killed")["status"]["progress"]["step"] <= total - 3,
             timeout=JOB_TIMEOUT, every=0.2)
    assert _kill_pod_processes(job_namespace, contract.pod_name("killed", 1)) > 0
    # The new gang's pods exist only once the old ones are gone: the bucket's newest complete
    # checkpoint is then what it resumes from.
    wait_for("attempt 2's pods", lambda: [p for p in _pods(local_cluster, job_namespace)
                                          if p["metadata"]["labels"].get(contract.LABEL_JOB_NAME) == "killed"
                                          and p["metadata"]["labels"].get(contract.LABEL_ATTEMPT) == "2"],
             timeout=JOB_TIMEOUT, every=0.2)
    expected = _complete_steps(outputs, "killed")[-1]

    finals = {name: sandbox.follow(kubectl, job_namespace, name, JOB_TIMEOUT, interval=0.5)["status"]
              for name in ("killed", "whole")}
    log = local_cluster.kubectl("logs", contract.pod_name("killed", 0), "-n", job_namespace).stdout
    assert finals["killed"]["phase"] == finals["whole"]["phase"] == "Succeeded", json.dumps(finals, indent=1) + log[-3000:]
    assert finals["killed"]["attempt"] == 2 and finals["whole"].get("restarts", 0) == 0

    # Attempt 2 fetched the bucket's checkpoint (no shared volume: its cache was empty) and its first
    # step is the checkpoint's step + 1.
    assert f"fetched checkpoint {contract.checkpoint_dir_name(expected)} from s3://loras/killed/checkpoints" in log
    resumed = re.search(rf"resuming from \S+ \(step (\d+) of {total}\)", log)
    assert resumed and int(resumed.group(1)) == expected, log[-3000:]
    assert _progress_steps(log)[0] == expected + 1, _progress_steps(log)
    fs = outputs.filesystem()
    metrics = fs.cat_file(f"loras/killed/{contract.ARTIFACT_METRICS}").decode().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(1, total + 1))

    # The LoRA equals the uninterrupted run's, bit for bit (CPU).
    manifests = {name: _verified_artifacts(outputs, name, finals[name]) for name in finals}
    lora = contract.ARTIFACT_LORA_DIFFUSERS
    assert manifests["killed"]["files"][lora]["sha256"] == manifests["whole"]["files"][lora]["sha256"]
