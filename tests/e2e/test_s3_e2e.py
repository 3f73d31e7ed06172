"""A 2-node job with no shared volume: model and dataset read from buckets of a real S3 server
(versitygw on the node bridge's address, which only the host and its pods reach), checkpoints and
the LoRA written to another bucket, credentials from a Secret."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from localcluster.recorder import WatchRecorder
from localcluster.s3server import S3Server
from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

BRIDGE_ADDRESS = "10.250.0.1"       # the host as pods of the process node see it (node/README.md)
JOB_TIMEOUT = 600


def _upload_folder(fs, local, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{prefix}/{path.relative_to(local).as_posix()}")


@pytest.fixture
def bridge_s3(local_cluster, tmp_path):
    # The bridge exists while the node runs, hence the local_cluster fixture first.
    server = S3Server.start(tmp_path / "s3", host=BRIDGE_ADDRESS)
    try:
        yield server
    finally:
        server.stop()


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


def test_a_two_node_job_reads_from_and_writes_to_s3_with_credentials_from_a_secret(
        local_cluster, job_namespace, data_dir, start_operator, bridge_s3, tmp_path):
    fs = bridge_s3.filesystem()
    for bucket in ("models", "datasets", "loras"):
        bridge_s3.create_bucket(bucket)
    _upload_folder(fs, data_dir / "model", "models/tiny-flux")
    _upload_folder(fs, data_dir / "dataset", "datasets/shapes")

    secret = {k: base64.b64encode(v.encode()).decode() for k, v in bridge_s3.client_env().items()}
    local_cluster.kubectl("apply", "-n", job_namespace, "-f", "-", check=True, input=json.dumps(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"}, "data": secret}))

    name = "s3job"
    job = sandbox.quickstart_job(data_dir, name, training={"stepsPerEpoch": 4, "checkpointEverySteps": 2})
    spec = job["spec"]
    ref = {"name": "s3-creds"}
    spec["model"].update(uri="s3://models/tiny-flux", secretRef=ref)
    spec["dataset"].update(uri="s3://datasets/shapes", secretRef=ref)
    spec["output"].update(uri=f"s3://loras/{name}", secretRef=ref)
    # No shared volume: each pod gets its own empty cache folder.
    spec["resources"]["volumes"] = [{"name": "cache", "emptyDir": {}}]
    spec["resources"]["volumeMounts"] = [{"name": "cache", "mountPath": "/cache"}]
    spec["resources"]["env"].append({"name": "LORAKUBE_CACHE_DIR", "value": "/cache"})

    start_operator()
    watch = WatchRecorder(local_cluster.kubectl_path, local_cluster.kubeconfig,
                          f"{contract.PLURAL}.{contract.API_GROUP}", job_namespace, tmp_path / "watch", {})
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    try:
        final = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, name, JOB_TIMEOUT, interval=0.5)
    finally:
        watch.stop()
    status = final["status"]
    pods = json.loads(local_cluster.kubectl("get", "pods", "-n", job_namespace, "-o", "json", check=True).stdout)
    logs = {p["metadata"]["name"]: local_cluster.kubectl("logs", p["metadata"]["name"], "-n", job_namespace).stdout
            for p in pods["items"]}
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + "\n".join(v[-3000:] for v in logs.values())
    _assert_staging_then_running([json.loads(p.read_text()) for p in watch.written], data_dir)

    # status.artifacts: the objects in the bucket, their sha256 and sizes the objects' own
    published = {a["uri"].rsplit("/", 1)[-1]: a for a in status["artifacts"]}
    assert {contract.ARTIFACT_LORA_DIFFUSERS, contract.ARTIFACT_MANIFEST} <= set(published)
    manifest = json.loads(fs.cat_file(f"loras/{name}/{contract.ARTIFACT_MANIFEST}"))
    for file_name, entry in published.items():
        assert entry["uri"] == f"s3://loras/{name}/{file_name}"
        body = fs.cat_file(f"loras/{name}/{file_name}")
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (entry["sha256"], entry["bytes"]), file_name
        if file_name != contract.ARTIFACT_MANIFEST:
            assert manifest["files"][file_name] == {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    # checkpoints reached the bucket, with the rank-1 RNG file that came from the other pod's cache
    marker = json.loads(fs.cat_file(f"loras/{name}/checkpoints/step-000000004/{contract.CHECKPOINT_COMPLETE_MARKER}"))
    assert "rng-rank-00001.pt" in marker["files"]

    # No pod mounted a shared volume, and the Secret's values reached the pods only by reference.
    for pod in pods["items"]:
        assert all("hostPath" not in v and "persistentVolumeClaim" not in v for v in pod["spec"].get("volumes", []))
        container = pod["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": ref}]
    # The secret key appears in no log line, Event, status, pod spec or artifact.
    key = bridge_s3.secret_key
    events = local_cluster.kubectl("get", "events", "-n", job_namespace, "-o", "json", check=True).stdout
    for where, text in (*logs.items(), ("events", events), ("status", json.dumps(status)), ("pods", json.dumps(pods)),
                        ("job", json.dumps(final))):
        assert key not in text, where
    for path in fs.find(f"loras/{name}"):
        assert key.encode() not in fs.cat_file(path), path
