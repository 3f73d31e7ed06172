"""Jobs through the operator whose model, dataset, checkpoints and LoRA live in gs:// or az://
buckets, on EMULATORS of Google Cloud Storage (fake-gcs-server) and Azure Blob Storage (Azurite)
listening on the node bridge's address (the clouds cannot be reached here). Each section's Secret
holds what a user would put there; no pod mounts a shared volume; no Secret value shows anywhere.
Slow: one tiny training per scheme."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lorakube_api import contract
from lorakube_dev import sandbox
from localcluster.node.hostregistry import GATEWAY

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

JOB_TIMEOUT = 600
BRIDGE_ADDRESS = str(GATEWAY)     # the host as pods of the process node see it (node/README.md)
SECRET = "cloud-creds"


def _service_account_json() -> str:
    """A service-account key file as Google issues it (a fresh RSA key): the emulator is spoken to
    anonymously, so this only has to reach the trainer intact and leak nowhere."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return json.dumps({"type": "service_account", "project_id": "lorakube-test", "private_key_id": "k1",
                       "private_key": pem, "client_email": "trainer@lorakube-test.iam.gserviceaccount.com",
                       "token_uri": "https://oauth2.googleapis.com/token"})


@pytest.fixture
def cloud_server(request: pytest.FixtureRequest, local_cluster, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The emulator of the test's scheme on the bridge address, what the Secret holds, the values
    that must never show, and a file system client for the test's own checks."""
    scheme = request.param
    if scheme == "gs":
        from localcluster.gcsserver import GcsServer

        server = GcsServer.start(tmp_path / "gcs", host=BRIDGE_ADDRESS)
        key = _service_account_json()
        secret = {**server.client_env(), "GCS_SERVICE_ACCOUNT_JSON": key}
        hidden = [json.loads(key)["private_key"].splitlines()[1]]       # a line of the PEM body
        create: Callable[[str], Any] = server.create_bucket
        count = lambda: server.count("GET", "alt=media")               # noqa: E731 - a one-line probe
    else:
        from localcluster.azurite import AzuriteServer

        server = AzuriteServer.start(tmp_path / "azurite", host=BRIDGE_ADDRESS)
        secret = server.client_env()
        hidden = [server.account_key]
        create = server.create_container
        count = lambda: server.count("Blob_Download")                  # noqa: E731
    try:
        yield {"scheme": scheme, "server": server, "secret": secret, "hidden": hidden, "create": create,
               "fs": server.filesystem(), "downloads": count}
    finally:
        server.stop()


def _upload_folder(fs, local: Path, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{prefix}/{path.relative_to(local).as_posix()}")


@pytest.mark.parametrize("cloud_server", ["gs", "az"], indirect=True)
def test_emulated_job_reads_its_inputs_from_and_writes_its_lora_to_the_bucket(
        cloud_server, local_cluster, job_namespace, data_dir, start_operator):
    scheme, fs = cloud_server["scheme"], cloud_server["fs"]
    for bucket in ("models", "datasets", "loras"):
        cloud_server["create"](bucket)
    _upload_folder(fs, data_dir / "model", "models/tiny-flux")
    _upload_folder(fs, data_dir / "dataset", "datasets/shapes")
    data = {k: base64.b64encode(v.encode()).decode() for k, v in cloud_server["secret"].items()}
    local_cluster.kubectl("apply", "-n", job_namespace, "-f", "-", check=True, input=json.dumps(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "data": data}))

    name = f"{scheme}job"
    job = sandbox.quickstart_job(data_dir, name, training={"stepsPerEpoch": 4, "checkpointEverySteps": 2})
    spec = job["spec"]
    spec["model"].update(uri=f"{scheme}://models/tiny-flux", secretRef={"name": SECRET})
    spec["dataset"].update(uri=f"{scheme}://datasets/shapes", secretRef={"name": SECRET})
    spec["output"].update(uri=f"{scheme}://loras/{name}", secretRef={"name": SECRET})
    # No shared volume: the pod's cache is its own emptyDir.
    spec["resources"]["volumes"] = [{"name": "cache", "emptyDir": {}}]
    spec["resources"]["volumeMounts"] = [{"name": "cache", "mountPath": "/cache"}]
    spec["resources"]["env"].append({"name": "LORAKUBE_CACHE_DIR", "value": "/cache"})
    operator = start_operator()
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    final = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, name, JOB_TIMEOUT, interval=0.5)
    status = final["status"]
    pods = json.loads(local_cluster.kubectl("get", "pods", "-n", job_namespace, "-o", "json", check=True).stdout)["items"]
    logs = {p["metadata"]["name"]: local_cluster.kubectl("logs", p["metadata"]["name"], "-n", job_namespace).stdout
            for p in pods}
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + "\n".join(v[-3000:] for v in logs.values())

    # The inputs came from the emulator; status.artifacts are its objects, with their own sha256.
    assert cloud_server["downloads"]() > 0
    published = {a["uri"].rsplit("/", 1)[-1]: a for a in status["artifacts"]}
    assert {contract.ARTIFACT_LORA_DIFFUSERS, contract.ARTIFACT_MANIFEST} <= set(published)
    manifest = json.loads(fs.cat_file(f"loras/{name}/{contract.ARTIFACT_MANIFEST}"))
    for file_name, entry in published.items():
        assert entry["uri"] == f"{scheme}://loras/{name}/{file_name}"
        body = fs.cat_file(f"loras/{name}/{file_name}")
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (entry["sha256"], entry["bytes"]), file_name
        if file_name != contract.ARTIFACT_MANIFEST:
            assert manifest["files"][file_name] == {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    assert fs.exists(f"loras/{name}/checkpoints/step-000000004/{contract.CHECKPOINT_COMPLETE_MARKER}")

    # The Secret reached the pod by reference only, and its values show nowhere: logs (pod,
    # operator), Events, the job and its status, pod env values, the objects the job wrote.
    for pod in pods:
        assert all("hostPath" not in v and "persistentVolumeClaim" not in v for v in pod["spec"].get("volumes", []))
    events = local_cluster.kubectl("get", "events", "-n", job_namespace, "-o", "json", check=True).stdout
    values = [e.get("value", "") for p in pods for c in p["spec"]["containers"] for e in c.get("env", [])]
    texts = {**logs, "operator log": operator.log_text(), "job": json.dumps(final), "events": events,
             "pods": json.dumps(pods), "env values": "\n".join(values)}
    objects = fs.find(f"loras/{name}")
    assert any(o.endswith(contract.ARTIFACT_TRAINING_CONFIG) for o in objects), objects
    for hidden in cloud_server["hidden"]:
        for where, text in texts.items():
            assert hidden not in text, where
        for path in objects:
            assert hidden.encode() not in fs.cat_file(path), path
