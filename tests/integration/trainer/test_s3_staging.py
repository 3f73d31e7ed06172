"""Staging against a real S3 server (versitygw on 127.0.0.1): rank 0's staging reports as they reach
the API (a loopback HTTP server records the merge patches StatusPatcher sends), and the cache cap
(LORAKUBE_CACHE_MAX_BYTES) evicting the least recently used input of an earlier process."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from lorakube_trainer import input_cache, storage
from lorakube_trainer.progress import ApiTarget, StatusPatcher
from lorakube_trainer.staging import StagingReporter

MODEL_FILES = {"transformer/weights.bin": 4 << 20, "vae/weights.bin": 2 << 20, "model_index.json": 300}
MODEL_BYTES = sum(MODEL_FILES.values())


class Recorder(http.server.BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_PATCH(self) -> None:  # noqa: N802 - http.server's naming
        Recorder.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        """Quiet: the recorded bodies are what the test reads."""


@pytest.fixture
def api(tmp_path: Path) -> Iterator[StatusPatcher]:
    Recorder.bodies = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("tok")
    yield StatusPatcher(ApiTarget(f"http://127.0.0.1:{httpd.server_address[1]}", str(token), None, "ns", "job"))
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def model_uri(s3_server) -> str:
    s3_server.create_bucket("stage-models")
    fs = s3_server.filesystem()
    for rel, size in MODEL_FILES.items():
        fs.pipe_file(f"stage-models/flux/{rel}", os.urandom(size))
    return "s3://stage-models/flux"


def test_staging_a_model_reports_increasing_bytes_the_right_total_and_a_final_report_equal_to_it(
        s3_server, model_uri, api, tmp_path):
    env = {**s3_server.client_env(), storage.ENV_CACHE_DIR: str(tmp_path / "cache")}
    # No throttle here (tests/unit/trainer/test_input_cache.py checks it): every callback is a report.
    reporter = StagingReporter(1, patcher=api, interval_s=0.0)
    reporter.begin("model", model_uri)
    folder = storage.stage_input(model_uri, env, on_bytes=reporter.on_bytes)
    reporter.end(input_cache.entry_bytes(folder), complete=True)

    reports = [body["status"]["progress"]["staging"] for body in Recorder.bodies]
    done = [r["bytesDone"] for r in reports]
    assert done == sorted(done), "bytes never go back"
    assert len({d for d in done if 0 < d < MODEL_BYTES}) >= 3, done      # seen growing, not just 0 and the end
    assert all(r["bytesTotal"] == MODEL_BYTES for r in reports[1:])     # the first is sent before the listing
    assert reports[-1]["bytesDone"] == MODEL_BYTES and reports[-1]["complete"] is True
    assert reports[-1]["cached"] is False
    assert all(r["uri"] == model_uri and r["input"] == "model" and r["attempt"] == 1 for r in reports)
    assert Recorder.bodies[-1]["status"]["progress"]["text"] == "model 6.0/6.0 MiB"
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != storage.STAGED_MARKER) == MODEL_BYTES

    # The same model again on this node: a cache hit, reported as such, with no byte in between.
    Recorder.bodies = []
    again = StagingReporter(1, patcher=api, interval_s=0.0)
    again.begin("model", model_uri)
    assert storage.stage_input(model_uri, env, on_bytes=again.on_bytes) == folder
    again.end(input_cache.entry_bytes(folder), complete=True)
    reports = [body["status"]["progress"]["staging"] for body in Recorder.bodies]
    assert [(r["bytesDone"], r["cached"], r["complete"]) for r in reports] == [(0, False, False),
                                                                                (MODEL_BYTES, True, True)]


def test_a_pretrained_lora_in_a_bucket_is_staged_and_reported_like_the_model(s3_server, tmp_path, capsys):
    """Local model and dataset, the LoRA to start from in a bucket: rank 0 reports its bytes as
    input pretrainedLora, the last report completes the staging, and the config points at the copy."""
    from lorakube_trainer import remote
    from lorakube_trainer.config import parse_config

    s3_server.create_bucket("stage-loras")
    lora = os.urandom(3 << 20)
    s3_server.filesystem().pipe_file("stage-loras/cats-v1/pytorch_lora_weights.safetensors", lora)
    uri = "s3://stage-loras/cats-v1"
    cfg = parse_config(["--model_family", "flux", "--model_path", str(tmp_path / "model"), "--dataset_path",
                        str(tmp_path / "data"), "--output_path", str(tmp_path / "out"), "--pretrained_lora_path",
                        uri], env={})
    env = {**s3_server.client_env(), storage.ENV_CACHE_DIR: str(tmp_path / "cache")}
    capsys.readouterr()
    local, _ = remote.localize(cfg, env, report_staging=True)
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {r["input"] for r in reports} == {"pretrainedLora"} and all(r["uri"] == uri for r in reports)
    done = [r["bytesDone"] for r in reports]
    assert done == sorted(done) and done[-1] == len(lora) and reports[-1]["complete"] is True
    assert (Path(local.pretrained_lora_path) / "pytorch_lora_weights.safetensors").read_bytes() == lora
    assert (local.model_path, local.dataset_path) == (cfg.model_path, cfg.dataset_path)


STAGE = "import sys; from lorakube_trainer import storage; print(storage.stage_input(sys.argv[1]))"


def stage_in_a_process(uri: str, env: dict[str, str]) -> Path:
    """One trainer process on the node: it stages, uses the input and exits (its locks go with it)."""
    done = subprocess.run([sys.executable, "-c", STAGE, uri], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1])


def test_the_cache_cap_evicts_the_least_recently_used_input_before_a_new_download(s3_server, model_uri, tmp_path):
    fs = s3_server.filesystem()
    fs.pipe_file("stage-models/other/weights.bin", os.urandom(5 << 20))
    env = {**s3_server.client_env(), storage.ENV_CACHE_DIR: str(tmp_path / "cache"),
           input_cache.ENV_CACHE_MAX_BYTES: str(MODEL_BYTES + (1 << 20))}    # room for one of the two
    first = stage_in_a_process(model_uri, env)
    assert (first / storage.STAGED_MARKER).is_file()
    second = stage_in_a_process("s3://stage-models/other", env)
    assert (second / storage.STAGED_MARKER).is_file()
    assert not first.exists(), "the least recently used input was not evicted"
    # Under the cap with room to spare, nothing goes.
    roomy = {**env, input_cache.ENV_CACHE_MAX_BYTES: "1Gi"}
    third = stage_in_a_process(model_uri, roomy)
    assert third.is_dir() and second.is_dir()


def test_a_bad_cache_cap_fails_the_staging_naming_the_variable(s3_server, model_uri, tmp_path):
    env = {**s3_server.client_env(), storage.ENV_CACHE_DIR: str(tmp_path / "cache"),
           input_cache.ENV_CACHE_MAX_BYTES: "plenty"}
    with pytest.raises(storage.StorageError, match=input_cache.ENV_CACHE_MAX_BYTES):
        storage.stage_input(model_uri, env)
