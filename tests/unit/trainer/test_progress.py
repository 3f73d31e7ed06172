"""Progress: rate-limited JSON lines on stdout, and merge-patches of status.progress received by a
real local HTTP server; API failures never fail training."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import threading
from pathlib import Path
from typing import Iterator

import pytest

from lorakube_api import contract
from lorakube_trainer.progress import ApiTarget, ProgressReporter, StatusPatcher, api_target_from_env


class Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[dict] = []
    status = 200
    first_statuses: list[int] = []     # answered, in order, before `status`

    def do_PATCH(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        self.send_response(Recorder.first_statuses.pop(0) if Recorder.first_statuses else Recorder.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        """Keep the test output quiet: the recorded requests are what the tests read."""


@pytest.fixture
def server() -> Iterator[str]:
    Recorder.requests, Recorder.status, Recorder.first_statuses = [], 200, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("tok\n")
    return path


@pytest.fixture
def _target(token_file: Path):
    def make(url: str) -> ApiTarget:
        return ApiTarget(base_url=url, token_file=str(token_file), ca_file=None, namespace="team-a",
                         job_name="cats")
    return make


def test_rate_limited_lines_and_patches(server: str, _target) -> None:
    clock, out = FakeClock(), io.StringIO()
    reporter = ProgressReporter(10, interval_s=5.0, out=out, patcher=StatusPatcher(_target(server)), clock=clock)
    sent = []
    for step in range(1, 11):
        clock.now += 1.0                              # one step per second
        sent.append(reporter.report(step, epoch=0, loss=0.5 / step, samples_per_step=4))
    # First report, then one per 5 s, and always the final step.
    assert [s for s, ok in zip(range(1, 11), sent) if ok] == [1, 6, 10]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["step"] for line in lines] == [1, 6, 10]
    assert lines[0]["event"] == contract.PROGRESS_EVENT
    final = lines[-1]
    assert final["totalSteps"] == 10 and final["etaSeconds"] == 0 and final["samplesPerSecond"] == 4.0
    assert len(Recorder.requests) == 3
    request = Recorder.requests[-1]
    assert request["path"] == "/apis/lorakube.io/v1alpha1/namespaces/team-a/loratrainingjobs/cats/status"
    assert request["headers"]["Content-Type"] == "application/merge-patch+json"
    assert request["headers"]["Authorization"] == "Bearer tok"
    progress = request["body"]["status"]["progress"]
    assert progress["step"] == 10 and progress["totalSteps"] == 10 and progress["loss"] == "0.05"
    assert request["body"] == {"status": {"progress": progress}}


def test_eta_from_the_observed_rate(server: str) -> None:
    clock = FakeClock()
    reporter = ProgressReporter(100, interval_s=0.0, out=io.StringIO(), clock=clock)
    reporter.report(1, 0, 1.0, 2)
    clock.now += 10.0
    reporter.report(11, 0, 1.0, 2)
    line = json.loads(reporter.out.getvalue().splitlines()[-1])
    assert line["samplesPerSecond"] == 2.0 and line["etaSeconds"] == 89


def test_api_errors_are_logged_once_and_never_raise(server: str, caplog: pytest.LogCaptureFixture,
                                                    _target) -> None:
    Recorder.status = 403
    patcher = StatusPatcher(_target(server))
    clock = FakeClock()
    reporter = ProgressReporter(3, interval_s=0.0, out=io.StringIO(), patcher=patcher, clock=clock)
    for step in (1, 2, 3):
        clock.now += 1
        assert reporter.report(step, 0, 0.1, 1)
    assert len(Recorder.requests) == 3
    assert sum("could not patch" in r.message for r in caplog.records) == 1
    unreachable = StatusPatcher(_target("http://127.0.0.1:9"))
    assert unreachable.patch(contract.Progress(1, 3, 0, None, None, None, "now")) is False


def test_api_target_from_the_pods_environment(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "ca.crt").write_text("")
    env = {contract.ENV_REPORT_PROGRESS: "1", "KUBERNETES_SERVICE_HOST": "10.0.0.1",
           "KUBERNETES_SERVICE_PORT": "6443", contract.ENV_JOB_NAME: "cats", contract.ENV_JOB_NAMESPACE: "ns"}
    target = api_target_from_env(env, sa_dir=tmp_path)
    assert target.status_url == ("https://10.0.0.1:6443/apis/lorakube.io/v1alpha1/namespaces/ns/"
                                 "loratrainingjobs/cats/status")
    assert target.token() == "sa-token" and target.ca_file == str(tmp_path / "ca.crt")
    assert api_target_from_env({**env, contract.ENV_REPORT_PROGRESS: "0"}, sa_dir=tmp_path) is None
    assert api_target_from_env({**env, contract.ENV_JOB_NAME: ""}, sa_dir=tmp_path) is None


def test_published_artifacts_list_every_file_with_uri_checksum_size_and_format(server: str, tmp_path) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tok\n")
    host, port = server.removeprefix("http://").split(":")
    env = {contract.ENV_REPORT_PROGRESS: "1", "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
           contract.ENV_JOB_NAME: "cats", contract.ENV_JOB_NAMESPACE: "team-a"}
    target = api_target_from_env(env, sa_dir=sa)
    assert target is not None
    files = {contract.ARTIFACT_LORA_DIFFUSERS: {"sha256": "ab" * 32, "bytes": 14696},
             contract.ARTIFACT_MANIFEST: {"sha256": "cd" * 32, "bytes": 865}}
    # The in-cluster target speaks https; point the same credentials at the plain-http recorder.
    patcher = StatusPatcher(dataclasses.replace(target, base_url=server))
    assert patcher.patch_status({"artifacts": contract.artifacts_status("/data/out/", files)})
    body = Recorder.requests[-1]["body"]
    assert body == {"status": {"artifacts": [
        {"uri": "/data/out/manifest.json", "sha256": "cd" * 32, "bytes": 865, "format": "manifest"},
        {"uri": "/data/out/pytorch_lora_weights.safetensors", "sha256": "ab" * 32, "bytes": 14696,
         "format": "diffusers"}]}}


def test_the_token_is_read_again_for_every_request_so_a_rotated_one_is_used(server: str, token_file: Path,
                                                                            _target) -> None:
    # The kubelet rewrites the projected token before it expires; a token read once at start
    # would be refused an hour into a run.
    patcher = StatusPatcher(_target(server))
    progress = contract.Progress(1, 3, 0, 0.5, None, None, "2026-05-01T12:00:00Z")
    assert patcher.patch(progress)
    token_file.write_text("rotated\n")
    assert patcher.patch(progress)
    assert [r["headers"]["Authorization"] for r in Recorder.requests] == ["Bearer tok", "Bearer rotated"]
    token_file.unlink()
    assert patcher.patch(progress) is False        # gone: logged, training goes on
    assert len(Recorder.requests) == 2


def test_a_restarted_attempt_clears_the_previous_speed_and_eta_with_explicit_nulls(server: str, _target) -> None:
    clock = FakeClock()
    first = ProgressReporter(100, interval_s=0.0, out=io.StringIO(), patcher=StatusPatcher(_target(server)),
                             clock=clock)
    first.report(10, 0, 0.5, 4)
    clock.now += 10.0
    first.report(20, 0, 0.4, 4)
    assert Recorder.requests[-1]["body"]["status"]["progress"]["etaSeconds"] == 80
    # The gang restarts; the new attempt's first report knows no rate yet.
    out = io.StringIO()
    resumed = ProgressReporter(100, interval_s=0.0, out=out, patcher=StatusPatcher(_target(server)), clock=clock)
    clock.now += 60.0
    resumed.report(20, 0, None, 4)
    sent = Recorder.requests[-1]["body"]["status"]["progress"]
    # JSON merge patch (RFC 7386): null deletes the stored value; an absent key would keep it.
    assert sent["samplesPerSecond"] is None and sent["etaSeconds"] is None and sent["loss"] is None
    assert sent["step"] == 20 and sent["totalSteps"] == 100
    # The log line has nothing to delete: it leaves unknown values out instead of printing nulls.
    line = json.loads(out.getvalue())
    assert {"samplesPerSecond", "etaSeconds", "loss"}.isdisjoint(line) and line["step"] == 20


def test_the_last_step_and_the_artifact_list_ride_out_a_busy_api_server(server: str, _target, tmp_path) -> None:
    # Nothing replaces them later: one timed-out write used to leave a Succeeded job with no
    # status.artifacts. Routine reports are not retried (the next one replaces them).
    Recorder.first_statuses = [503, 429]
    patcher = StatusPatcher(_target(server), backoff_s=0.01)
    clock = FakeClock()
    reporter = ProgressReporter(2, interval_s=0.0, out=io.StringIO(), patcher=patcher, clock=clock)
    assert reporter.report(1, 0, 0.5, 1)
    assert len(Recorder.requests) == 1                 # refused with 503, not retried
    assert reporter.report(2, 0, 0.4, 1)
    assert len(Recorder.requests) == 3                 # 429, then accepted
    assert Recorder.requests[-1]["body"]["status"]["progress"]["step"] == 2

    Recorder.first_statuses = [502, 504]
    files = {contract.ARTIFACT_MANIFEST: {"sha256": "cd" * 32, "bytes": 865}}
    assert patcher.patch_status({"artifacts": contract.artifacts_status("/out", files)}, attempts=5)
    assert len(Recorder.requests) == 6 and "artifacts" in Recorder.requests[-1]["body"]["status"]


def test_a_refused_write_is_not_retried(server: str, _target) -> None:
    Recorder.status = 403
    patcher = StatusPatcher(_target(server), backoff_s=0.01)
    assert patcher.patch_status({"artifacts": []}, attempts=5) is False
    assert len(Recorder.requests) == 1
