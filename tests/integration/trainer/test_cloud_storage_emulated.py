"""The trainer's gs:// and az:// locations against EMULATORS of Google Cloud Storage
(fake-gcs-server, built from source by `python -m localcluster build gcs`) and Azure Blob Storage
(Azurite, `python -m localcluster build azurite`), on 127.0.0.1: the clouds themselves cannot be
reached here. The real clients (gcsfs, adlfs and Azure's SDK) talk to them; nothing is mocked.
Each test runs once per scheme; the servers start once per test session."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from test_multiprocess import EXAMPLE_DATASET, PROCESS_TIMEOUT, base_env

from lorakube_api import contract
from lorakube_trainer import locations, preflight, remote, storage


@dataclass
class Cloud:
    """One emulator as the tests see it."""

    scheme: str
    server: Any
    env: dict[str, str]                       # what the Secret would hold
    downloads: Callable[[int], int]           # object downloads after the first n requests
    requests: Callable[[], int]               # requests so far
    secret: str                               # a value that must never appear anywhere ("" if none)

    def bucket(self, prefix: str) -> str:
        """A new bucket (container) of this test's own."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        getattr(self.server, "create_container" if self.scheme == "az" else "create_bucket")(name)
        return name

    def fs(self) -> Any:
        return self.server.filesystem()


@pytest.fixture(params=["gs", "az"])
def cloud(request: pytest.FixtureRequest) -> Cloud:
    if request.param == "gs":
        server = request.getfixturevalue("gcs_server")
        return Cloud("gs", server, server.client_env(),
                     lambda after: server.count("GET", "alt=media", after), lambda: len(server.requests()), "")
    server = request.getfixturevalue("azurite_server")
    return Cloud("az", server, server.client_env(), lambda after: server.count("Blob_Download", after),
                 lambda: len(server.requests()), server.account_key)


def _as_role(env: dict[str, str], role: str) -> dict[str, str]:
    """The Secret's keys as the operator hands them to the pod: under the role's prefix only."""
    prefix = contract.SECRET_ENV_PREFIXES[role]
    return {f"{prefix}{name}": value for name, value in env.items()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_emulated_input_is_staged_once_per_node_and_again_when_an_object_changes(cloud: Cloud, tmp_path: Path):
    bucket = cloud.bucket("models")
    fs = cloud.fs()
    files = {"model_index.json": b'{"_class_name": "FluxPipeline"}', "transformer/weights.bin": b"w" * 300_000,
             "vae/config.json": b"{}"}
    for rel, body in files.items():
        fs.pipe_file(f"{bucket}/flux/{rel}", body)
    uri = f"{cloud.scheme}://{bucket}/flux"
    env = {**storage.role_env(_as_role(cloud.env, "model"), "model"), storage.ENV_CACHE_DIR: str(tmp_path / "node")}

    seen: list[tuple[int, int | None]] = []
    before = cloud.requests()
    folder = locations.stage_input(uri, env, on_bytes=lambda done, total: seen.append((done, total)))
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != storage.STAGED_MARKER} == files
    assert cloud.downloads(before) == len(files)
    assert seen[-1] == (sum(map(len, files.values())),) * 2

    # A second job on the same node: the same folder, nothing downloaded.
    before = cloud.requests()
    assert locations.stage_input(uri, env) == folder
    assert cloud.downloads(before) == 0, "the second staging downloaded the input again"

    # A new version of one object: a new folder with the new bytes.
    fs.pipe_file(f"{bucket}/flux/vae/config.json", b'{"changed": true}')
    again = locations.stage_input(uri, env)
    assert again != folder and (again / "vae" / "config.json").read_bytes() == b'{"changed": true}'


def _checkpoint(root: Path, step: int) -> Path:
    """A real checkpoint folder, written by the trainer's own checkpoint code."""
    import torch

    from lorakube_trainer import checkpoint as ckpt

    tmp = ckpt.prepare_tmp(root, step)
    ckpt.write_trainable(tmp, {"lora.weight": torch.full((4, 4), float(step))})
    ckpt.write_state(tmp, {"global_step": step})
    return ckpt.finalize(root, step)


def test_emulated_checkpoints_upload_prune_and_resume_on_another_node(cloud: Cloud, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    from lorakube_trainer import checkpoint as ckpt

    bucket = cloud.bucket("loras")
    uri = f"{cloud.scheme}://{bucket}/run/checkpoints"
    # Rank 0's process: the output's Secret under its prefix only, as in a pod.
    for name, value in _as_role(cloud.env, "output").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(storage.ENV_CACHE_DIR, str(tmp_path / "node-a"))
    local = storage.work_folder("checkpoints", uri)
    for step in (2, 4, 6, 8):
        remote.publish_checkpoint(local, _checkpoint(local, step), keep=3)

    fs = cloud.fs()
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/run/checkpoints"))
    assert names == [contract.checkpoint_dir_name(s) for s in (4, 6, 8)], names
    marker = json.loads(fs.cat_file(f"{bucket}/run/checkpoints/{contract.checkpoint_dir_name(8)}/"
                                    f"{contract.CHECKPOINT_COMPLETE_MARKER}"))
    for name, digest in marker["files"].items():
        assert _sha256(fs.cat_file(f"{bucket}/run/checkpoints/{contract.checkpoint_dir_name(8)}/{name}")) == digest

    # The gang restarted on another node (an empty cache, no shared volume) resumes from the bucket.
    node_b = tmp_path / "node-b"
    assert remote.fetch_latest_checkpoint(uri, node_b, storage.role_env(None, "output")) == 8
    fetched = ckpt.read_marker(node_b / contract.checkpoint_dir_name(8))
    assert fetched == marker


def test_emulated_artifacts_are_uploaded_verified_and_the_manifest_last(cloud: Cloud, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    bucket = cloud.bucket("artifacts")
    uri = f"{cloud.scheme}://{bucket}/cats-v1"
    local = tmp_path / "out"
    local.mkdir()
    files = {}
    for name, body in ((contract.ARTIFACT_LORA_DIFFUSERS, b"\x01" * 400_000), ("model_card.md", b"# cats\n")):
        (local / name).write_bytes(body)
        files[name] = {"sha256": _sha256(body), "bytes": len(body)}
    (local / contract.ARTIFACT_MANIFEST).write_text(json.dumps({"files": files}))
    for name, value in _as_role(cloud.env, "output").items():
        monkeypatch.setenv(name, value)

    verified = remote.publish_artifacts(local, uri, {"files": files})

    assert set(verified) == {*files, contract.ARTIFACT_MANIFEST}
    fs = cloud.fs()
    for name, entry in files.items():
        body = fs.cat_file(f"{bucket}/cats-v1/{name}")
        assert (_sha256(body), len(body)) == (entry["sha256"], entry["bytes"]), name
    assert json.loads(fs.cat_file(f"{bucket}/cats-v1/{contract.ARTIFACT_MANIFEST}"))["files"] == files
    # The manifest was written after every file it lists.
    modified = {name: fs.info(f"{bucket}/cats-v1/{name}") for name in verified}
    stamp = "updated" if cloud.scheme == "gs" else "last_modified"
    manifest_time = str(modified[contract.ARTIFACT_MANIFEST][stamp])
    assert all(str(info[stamp]) <= manifest_time for info in modified.values())
    # The write probe of preflight leaves nothing behind.
    storage.check_writable(uri, storage.role_env(None, "output"))
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/cats-v1")) == sorted(verified)


def _plain_cli(tmp: Path, name: str, args: list[str], **env: str) -> tuple[int, str]:
    """`lorakube-train` itself (no probe, so no torch import before the checks fail)."""
    full_env = base_env(**{storage.ENV_CACHE_DIR: str(tmp / f"cache-{name}"), **env})
    done = subprocess.run([sys.executable, "-m", "lorakube_trainer", *args], env=full_env, capture_output=True,
                          text=True, timeout=PROCESS_TIMEOUT)
    (tmp / f"{name}.log").write_text(done.stdout + done.stderr)
    return done.returncode, done.stdout + done.stderr


def _flags(model: Path, output: str) -> list[str]:
    return ["--model_family", "flux", "--model_path", str(model), "--dataset_path", str(EXAMPLE_DATASET),
            "--output_path", output, "--height", "32", "--width", "32", "--precision", "32", "--max_epochs", "1",
            "--steps_per_epoch", "1", "--batch_size", "1", "--accelerator", "cpu"]


def test_emulated_az_container_without_write_access_fails_preflight_naming_the_uri(azurite_server, tmp_path: Path):
    container = azurite_server.create_container(f"readonly-{uuid.uuid4().hex[:8]}")
    azurite_server.filesystem().pipe_file(f"{container}/existing/readme.txt", b"kept")
    # A SAS that may read and list the container but not write to it: what a user granted too little has.
    read_only = azurite_server.sas_env(container, "rl")
    sas = read_only["AZURE_STORAGE_CONNECTION_STRING"].split("SharedAccessSignature=", 1)[1]
    uri = f"az://{container}/cats-v1"
    assert storage.list_remote(f"az://{container}/existing", read_only) == ["readme.txt"]   # the SAS works

    before = len(azurite_server.requests())
    started = time.monotonic()
    # The output is checked first: the model folder is never looked at (an empty one will do).
    code, log = _plain_cli(tmp_path, "denied", _flags(tmp_path, uri), **_as_role(read_only, "output"))
    seconds = time.monotonic() - started
    last = log.strip().splitlines()[-1]
    assert code == contract.EXIT_PREFLIGHT_OUTPUT, log[-3000:]
    assert f"{contract.PREFLIGHT_FAILED}: output not writable: {uri} (cannot write to {uri}" in last, last
    assert "Storage Blob Data Contributor" in last, last
    assert "staging" not in log and not (tmp_path / "cache-denied").exists()    # no model loaded
    assert seconds < 60, seconds
    assert azurite_server.count("BlockBlob_Upload", before) == 1, azurite_server.requests()[before:]  # a 403 is not retried
    for value in (sas, sas.split("sig=", 1)[1].split("&", 1)[0], azurite_server.account_key):
        assert value not in log


def test_emulated_missing_bucket_fails_preflight_naming_the_uri(cloud: Cloud, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    uri = f"{cloud.scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    for name, value in _as_role(cloud.env, "output").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(preflight.PreflightFailed) as failed:
        preflight.check_writable_folder(uri, contract.EXIT_PREFLIGHT_OUTPUT, "output not writable")
    assert failed.value.code == contract.EXIT_PREFLIGHT_OUTPUT
    assert f"output not writable: {uri} (cannot write to {uri}" in str(failed.value)
    assert "must exist" in str(failed.value)
    with pytest.raises(storage.StorageError, match=f"{uri}"):
        locations.check_readable(uri, storage.role_env(None, "output"))


def test_emulated_az_wrong_account_key_fails_fast_and_never_shows_the_key(azurite_server, tmp_path: Path):
    container = azurite_server.create_container(f"keys-{uuid.uuid4().hex[:8]}")
    azurite_server.filesystem().pipe_file(f"{container}/set/a.txt", b"a")
    wrong_key = "QUJD" * 22
    env = {"AZURE_STORAGE_CONNECTION_STRING":
           azurite_server.connection_string().replace(azurite_server.account_key, wrong_key)}
    before = len(azurite_server.requests())
    with pytest.raises(storage.StorageError) as failed:
        storage.check_readable(f"az://{container}/set", env)
    refused = azurite_server.requests()[before:]
    assert refused and len(refused) == len(set(refused)), refused       # each call refused once, not retried
    message = str(failed.value)
    assert message.startswith(f"cannot read az://{container}/set: ") and "AZURE_STORAGE_CONNECTION_STRING" in message
    assert wrong_key not in message and azurite_server.account_key not in message


class _TokenStandIn(http.server.BaseHTTPRequestHandler):
    """A loopback STAND-IN of Google's OAuth token endpoint: checks the service account's signed
    JWT (RS256, against the key file's public key) and answers an access token, as Google does."""

    public_key: Any = None
    grants: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        header, claims, signature = form["assertion"][0].split(".")
        pad = lambda part: base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))   # noqa: E731
        self.public_key.verify(pad(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
        _TokenStandIn.grants.append({"grant_type": form["grant_type"][0], **json.loads(pad(claims))})
        body = json.dumps({"access_token": "ya29.stand-in", "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet: the recorded grants are what the test reads."""


def test_emulated_gs_service_account_key_from_the_secret_signs_in_and_writes(gcs_server, tmp_path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _TokenStandIn.public_key, _TokenStandIn.grants = key.public_key(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenStandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    key_file = {"type": "service_account", "project_id": "lorakube-test", "private_key_id": "k1", "private_key": pem,
                "client_email": "trainer@lorakube-test.iam.gserviceaccount.com",
                "token_uri": f"http://127.0.0.1:{httpd.server_address[1]}/token"}
    # What the user's Secret holds (the key file), plus the endpoint the emulator stands for.
    secret = {"GCS_SERVICE_ACCOUNT_JSON": json.dumps(key_file), "GCS_ENDPOINT_URL": gcs_server.endpoint}
    bucket = gcs_server.create_bucket(f"keyed-{uuid.uuid4().hex[:8]}")
    try:
        env = storage.role_env(_as_role(secret, "output"), "output")
        storage.check_writable(f"gs://{bucket}/run", env)
        local = tmp_path / "f.txt"
        local.write_bytes(b"signed in")
        fs = storage.filesystem(env, f"gs://{bucket}")
        storage.upload_verified(fs, local, f"gs://{bucket}/run/f.txt", _sha256(b"signed in"))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert gcs_server.filesystem().cat_file(f"{bucket}/run/f.txt") == b"signed in"
    # The service account signed in with its own key, for the storage scope only.
    assert _TokenStandIn.grants, "no token was requested"
    grant = _TokenStandIn.grants[0]
    assert grant["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert grant["iss"] == key_file["client_email"] and grant["scope"] == storage.GCS_SCOPE


# Each scheme waits out a few seconds of outage with backoff: in the slow tier (about 15 s each).
@pytest.mark.slow
def test_emulated_outage_during_the_upload_delays_it_and_it_completes_verified(
        cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bucket = cloud.bucket("outage")
    uri = f"{cloud.scheme}://{bucket}/run"
    local = tmp_path / "out"
    local.mkdir()
    files = {}
    for name, body in ((contract.ARTIFACT_LORA_DIFFUSERS, b"x" * 300_000), ("model_card.md", b"# card\n")):
        (local / name).write_bytes(body)
        files[name] = {"sha256": _sha256(body), "bytes": len(body)}
    (local / contract.ARTIFACT_MANIFEST).write_text(json.dumps({"files": files}))
    for name, value in _as_role(cloud.env, "output").items():
        monkeypatch.setenv(name, value)
    result: dict = {}

    def upload() -> None:
        try:
            result["verified"] = remote.publish_artifacts(local, uri, {"files": files})
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    cloud.server.stop()
    try:
        worker = threading.Thread(target=upload)
        worker.start()
        time.sleep(5)              # several failed attempts while the server is down
        assert worker.is_alive(), result           # retried with backoff, not given up
    finally:
        cloud.server.restart()
    worker.join(timeout=120)
    fs = cloud.fs()
    assert "error" not in result, result.get("error")
    assert set(result["verified"]) == {*files, contract.ARTIFACT_MANIFEST}
    for name, entry in files.items():
        assert _sha256(fs.cat_file(f"{bucket}/run/{name}")) == entry["sha256"]
