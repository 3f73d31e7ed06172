"""The trainer against a real S3 server (versitygw with its POSIX backend, built from source by
`python -m localcluster build s3`, on 127.0.0.1): s3:// model, dataset, checkpoints and output, with
credentials from the standard AWS variables only. No storage API is mocked."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_multiprocess import EXAMPLE_DATASET, PROCESS_TIMEOUT, base_env, finish, start, tiny_flux  # noqa: F401

from lorakube_api import contract
from lorakube_trainer import remote, storage

STEPS_PER_EPOCH = 3
MAX_EPOCHS = 2            # 6 optimizer steps; checkpoints every 2


def _upload_folder(fs, local: Path, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{prefix}/{path.relative_to(local).as_posix()}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def buckets(s3_server, tiny_flux: Path) -> dict[str, str]:
    """The tiny FLUX and the example dataset in their own buckets, and an empty one for outputs."""
    for name in ("models", "datasets", "loras"):
        s3_server.create_bucket(name)
    fs = s3_server.filesystem()
    _upload_folder(fs, tiny_flux, "models/tiny-flux")
    _upload_folder(fs, EXAMPLE_DATASET, "datasets/shapes")
    return {"model": "s3://models/tiny-flux", "dataset": "s3://datasets/shapes", "out": "s3://loras"}


def _flags(buckets: dict[str, str], output: str, *extra: str) -> list[str]:
    return ["--model_family", "flux", "--model_path", buckets["model"], "--dataset_path", buckets["dataset"],
            "--output_path", output, "--height", "32", "--width", "32", "--precision", "32",
            "--steps_per_epoch", str(STEPS_PER_EPOCH), "--max_epochs", str(MAX_EPOCHS), "--batch_size", "1",
            "--random_flip", "--checkpoint_every_n_steps", "2", "--validation_inference_steps", "2",
            "--accelerator", "cpu", "--seed", "5", *extra]


def _train(s3_server, tmp: Path, name: str, args: list[str], cache: Path, **env: str) -> tuple[int, str]:
    probe = tmp / f"probe-{name}"
    probe.mkdir()
    full_env = base_env(PROBE_DIR=str(probe), **{storage.ENV_CACHE_DIR: str(cache), **s3_server.client_env(), **env})
    log = tmp / f"{name}.log"
    code = finish(start(args, full_env, log))
    return code, log.read_text()


def _plain_cli(s3_server, tmp: Path, name: str, args: list[str], cache: Path, **env: str) -> tuple[int, str]:
    """`lorakube-train` itself (no probe, so no torch import before the checks fail)."""
    full_env = base_env(**{storage.ENV_CACHE_DIR: str(cache), **s3_server.client_env(), **env})
    done = subprocess.run([sys.executable, "-m", "lorakube_trainer", *args], env=full_env, capture_output=True,
                          text=True, timeout=PROCESS_TIMEOUT)
    (tmp / f"{name}.log").write_text(done.stdout + done.stderr)
    return done.returncode, done.stdout + done.stderr


def _gets_under(s3_server, before: int, *prefixes: str) -> int:
    """GetObject requests for keys under the prefixes, in the access log after line `before`."""
    lines = [r.get("line", "") for r in s3_server.requests()[before:]]
    return sum(1 for line in lines if "s3_GetObject" in line and any(f" /{p}/" in line for p in prefixes))


def _lora_sha(tmp: Path, name: str) -> str:
    return json.loads((tmp / f"probe-{name}" / "rank-0.json").read_text())["lora_sha256"]


# Three tiny trainings (about 3 minutes on 2 busy cores): in the slow tier. The other tests here
# run in `make test` and cover staging, the outage and the refused write without training.
@pytest.mark.slow
def test_s3_in_and_out_resume_from_the_bucket_and_a_second_run_downloads_nothing(s3_server, buckets, tmp_path: Path):
    fs = s3_server.filesystem()
    node_a, node_b = tmp_path / "cache-node-a", tmp_path / "cache-node-b"

    # An uninterrupted run: inputs staged into node A's cache, everything written to the bucket.
    code, log = _train(s3_server, tmp_path, "whole", _flags(buckets, "s3://loras/whole"), node_a)
    assert code == 0, log[-4000:]
    assert _gets_under(s3_server, 0, "models/tiny-flux", "datasets/shapes") > 0

    # A second job on node A with the same URIs: nothing of the model or the dataset is downloaded.
    # It crashes after step 3: its newest checkpoint in the bucket is step 2.
    before = len(s3_server.requests())
    code, log = _train(s3_server, tmp_path, "cut", ["--crash-after-step", "3",
                                                    *_flags(buckets, "s3://loras/cut")], node_a)
    assert code != 0, log[-4000:]
    assert _gets_under(s3_server, before, "models/tiny-flux", "datasets/shapes") == 0, \
        "the second run on the same node downloaded its inputs again"
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("loras/cut/checkpoints"))
    assert steps == ["step-000000002"], steps
    assert fs.exists(f"loras/cut/checkpoints/step-000000002/{contract.CHECKPOINT_COMPLETE_MARKER}")
    assert not fs.exists(f"loras/cut/{contract.ARTIFACT_MANIFEST}")

    # The gang restarted on another node (an empty cache, no shared volume): it resumes from the
    # bucket's checkpoint, and its LoRA equals the uninterrupted run's bit for bit.
    code, log = _train(s3_server, tmp_path, "resumed", _flags(buckets, "s3://loras/cut"), node_b)
    assert code == 0, log[-4000:]
    assert "fetched checkpoint step-000000002 from s3://loras/cut/checkpoints" in log
    assert "resuming from" in log and "(step 2 of 6)" in log
    assert _lora_sha(tmp_path, "resumed") == _lora_sha(tmp_path, "whole")
    # Pruned as on a local volume: the newest 3 complete checkpoints stay.
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("loras/cut/checkpoints"))
    assert steps == ["step-000000002", "step-000000004", "step-000000006"], steps

    # The manifest's sha256 and byte counts are the objects' own.
    manifest = json.loads(fs.cat_file(f"loras/cut/{contract.ARTIFACT_MANIFEST}"))
    assert contract.ARTIFACT_LORA_DIFFUSERS in manifest["files"]
    for name, entry in manifest["files"].items():
        body = fs.cat_file(f"loras/cut/{name}")
        assert (_sha256(body), len(body)) == (entry["sha256"], entry["bytes"]), name
    whole = json.loads(fs.cat_file(f"loras/whole/{contract.ARTIFACT_MANIFEST}"))
    lora = contract.ARTIFACT_LORA_DIFFUSERS
    assert whole["files"][lora]["sha256"] == manifest["files"][lora]["sha256"]
    # metrics.jsonl kept the steps before the crash (uploaded with each checkpoint, fetched on resume)
    metrics = contract.ARTIFACT_METRICS
    assert [json.loads(line)["step"] for line in fs.cat_file(f"loras/cut/{metrics}").decode().splitlines()] == \
        [1, 2, 3, 4, 5, 6]
    assert whole["files"][metrics]["sha256"] == manifest["files"][metrics]["sha256"]

    # The config names the URIs the user gave, and no credential is written anywhere.
    config = json.loads(fs.cat_file(f"loras/cut/{contract.ARTIFACT_TRAINING_CONFIG}"))
    assert config["model_path"] == buckets["model"] and config["output_path"] == "s3://loras/cut"
    assert config["checkpoint_dir"] == "s3://loras/cut/checkpoints"
    secret = s3_server.secret_key.encode()
    for path in fs.find("loras"):
        assert secret not in fs.cat_file(path), path
    for name in ("whole", "cut", "resumed"):
        assert s3_server.secret_key not in (tmp_path / f"{name}.log").read_text(), name


def _steps(text: str) -> list[int]:
    return [json.loads(line)["step"] for line in text.splitlines()]


# Two tiny trainings (about 2 minutes on 2 busy cores): slow tier.
@pytest.mark.slow
def test_a_resume_on_another_node_keeps_one_metric_line_per_step(s3_server, buckets, tmp_path: Path):
    """Checkpoints in the bucket, the output on each node's own disk: the node that resumes has no
    earlier metric lines of its own; they come with the checkpoint, up to its step only."""
    fs = s3_server.filesystem()
    checkpoints = "s3://loras/node-local-output/checkpoints"
    out_a, out_b = tmp_path / "out-node-a", tmp_path / "out-node-b"
    # Crashes after step 5: the newest checkpoint is step 4, and node A's line of step 5 is from a
    # future the resume discards.
    code, log = _train(s3_server, tmp_path, "first", ["--crash-after-step", "5", *_flags(
        buckets, str(out_a), "--checkpoint_dir", checkpoints)], tmp_path / "cache-node-a")
    assert code != 0, log[-4000:]
    assert _steps((out_a / contract.ARTIFACT_METRICS).read_text()) == [1, 2, 3, 4, 5]
    for name in (contract.ARTIFACT_METRICS, contract.ARTIFACT_TIMINGS):
        assert _steps(fs.cat_file(f"loras/node-local-output/checkpoints/step-000000004/{name}").decode()) == \
            [1, 2, 3, 4], name
    marker = json.loads(fs.cat_file(f"loras/node-local-output/checkpoints/step-000000004/"
                                    f"{contract.CHECKPOINT_COMPLETE_MARKER}"))
    assert contract.ARTIFACT_METRICS in marker["files"]          # hashed with the checkpoint

    code, log = _train(s3_server, tmp_path, "second", _flags(buckets, str(out_b), "--checkpoint_dir", checkpoints),
                       tmp_path / "cache-node-b")
    assert code == 0, log[-4000:]
    assert "(step 4 of 6)" in log and f"restored {contract.ARTIFACT_METRICS}" in log
    for name in (contract.ARTIFACT_METRICS, contract.ARTIFACT_TIMINGS):
        assert _steps((out_b / name).read_text()) == [1, 2, 3, 4, 5, 6], name
    manifest = json.loads((out_b / contract.ARTIFACT_MANIFEST).read_text())
    assert manifest["files"][contract.ARTIFACT_METRICS]["sha256"] == _sha256(
        (out_b / contract.ARTIFACT_METRICS).read_bytes())


def test_a_changed_object_is_downloaded_again_and_a_partial_download_is_never_used(s3_server, tmp_path: Path):
    s3_server.create_bucket("staging")
    fs = s3_server.filesystem()
    fs.pipe_file("staging/set/a.txt", b"one")
    fs.pipe_file("staging/set/b.txt", b"two")
    env = {**s3_server.client_env(), storage.ENV_CACHE_DIR: str(tmp_path / "cache")}
    # A download cut short by a crash: a partial folder without the marker.
    objects = storage._listing(storage.filesystem(env), "s3://staging/set")
    leftover = tmp_path / "cache" / "inputs" / storage.stage_key("s3://staging/set", objects)
    leftover.mkdir(parents=True)
    (leftover / "a.txt").write_text("torn")
    first = storage.stage_input("s3://staging/set", env)
    assert first == leftover and (first / "a.txt").read_text() == "one" and (first / "b.txt").read_text() == "two"
    assert storage.stage_input("s3://staging/set", env) == first          # same ETags: the same folder
    fs.pipe_file("staging/set/b.txt", b"changed")
    second = storage.stage_input("s3://staging/set", env)
    assert second != first and (second / "b.txt").read_text() == "changed"


def test_an_outage_during_the_upload_delays_it_and_no_manifest_exists_meanwhile(s3_server, tmp_path: Path):
    s3_server.create_bucket("outage")
    local = tmp_path / "out"
    local.mkdir()
    files = {}
    for name, body in (("pytorch_lora_weights.safetensors", b"x" * 300_000), ("model_card.md", b"# card\n")):
        (local / name).write_bytes(body)
        files[name] = {"sha256": _sha256(body), "bytes": len(body)}
    (local / contract.ARTIFACT_MANIFEST).write_text(json.dumps({"files": files}))
    env_keys = s3_server.client_env()
    result: dict = {}

    def upload() -> None:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env_keys.items():
                mp.setenv(key, value)
            try:
                result["verified"] = remote.publish_artifacts(local, "s3://outage/run", {"files": files})
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

    s3_server.stop()
    worker = threading.Thread(target=upload)
    worker.start()
    bucket_dir = s3_server.root / "outage" / "run"
    time.sleep(4)                  # several failed attempts while the server is down
    assert worker.is_alive(), result
    assert not (bucket_dir / contract.ARTIFACT_MANIFEST).exists()
    s3_server.restart()
    worker.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert set(result["verified"]) == {*files, contract.ARTIFACT_MANIFEST}
    for name, entry in files.items():
        assert _sha256((bucket_dir / name).read_bytes()) == entry["sha256"]
    assert json.loads((bucket_dir / contract.ARTIFACT_MANIFEST).read_text())["files"] == files


def test_listing_and_pruning_checkpoints_during_an_outage_wait_for_the_server(s3_server, tmp_path: Path):
    # Between two checkpoint uploads rank 0 lists the bucket and prunes it: an endpoint restarting
    # then delays the run (backoff, as the uploads) instead of ending it.
    s3_server.create_bucket("blink")
    fs = s3_server.filesystem()
    step = f"blink/run/checkpoints/{contract.checkpoint_dir_name(2)}"
    fs.pipe_file(f"{step}/{contract.CHECKPOINT_COMPLETE_MARKER}", b"{}")
    fs.pipe_file(f"{step}/adapter.safetensors", b"x")
    env = s3_server.client_env()
    result: dict = {}

    def prune() -> None:
        try:
            result["steps"] = remote._complete_steps("s3://blink/run/checkpoints", env)
            storage.remove_prefix(f"s3://{step}", first=contract.CHECKPOINT_COMPLETE_MARKER, env=env)
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    s3_server.stop()
    worker = threading.Thread(target=prune)
    worker.start()
    time.sleep(10)                 # longer than s3fs's and botocore's own quick retries
    assert worker.is_alive(), result
    s3_server.restart()
    worker.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["steps"] == [2]
    assert not fs.exists(step)


def test_a_bucket_that_refuses_writes_fails_before_training_naming_the_uri(s3_server, buckets, tmp_path: Path):
    read_only = s3_server.sibling(tmp_path / "read-only-gateway", read_only=True)
    try:
        started = time.monotonic()
        code, log = _plain_cli(s3_server, tmp_path, "denied", _flags(buckets, "s3://loras/denied"), tmp_path / "cache",
                           AWS_ENDPOINT_URL=read_only.endpoint)
        seconds = time.monotonic() - started
    finally:
        read_only.stop()
    last = log.strip().splitlines()[-1]
    assert code == contract.EXIT_PREFLIGHT_OUTPUT, log[-3000:]
    assert f"{contract.PREFLIGHT_FAILED}: output not writable: s3://loras/denied" in last, last
    assert "cannot write to s3://loras/denied: PermissionError" in last and "PutObject" in last, last
    assert "staging" not in log and not (tmp_path / "cache").exists()     # nothing downloaded, no model loaded
    assert s3_server.secret_key not in log
    assert seconds < 30

    code, log = _plain_cli(s3_server, tmp_path, "no-bucket", _flags(buckets, "s3://no-such-bucket/run"),
                       tmp_path / "cache2")
    assert code == contract.EXIT_PREFLIGHT_OUTPUT, log[-3000:]
    assert "output not writable: s3://no-such-bucket/run (cannot write to s3://no-such-bucket/run" in \
        log.strip().splitlines()[-1]
