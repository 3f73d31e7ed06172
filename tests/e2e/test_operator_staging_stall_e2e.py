"""Staging that stops: the dataset is an https:// archive whose server sends 256 KiB and then
nothing more (the connection stays open, as a hung server or a half-dead link leaves it). The
trainer's staging hangs with no error of its own; the operator's stall rule
(spec.runPolicy.stagingProgressDeadlineSeconds) restarts the gang with reason StagingStalled, naming
where the bytes stopped, with rank 0's last log lines (tests/unit/operator/test_staging_phase.py covers the rest of the rule: the
job fails once maxRestarts is spent, bytes that keep arriving never stall). The server is an https
stand-in on the node bridge's address (localcluster/hub_standins.py), which only the host and its
pods reach."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from localcluster.hub_standins import HttpsFileStandIn
from lorakube_api import contract
from lorakube_dev import sandbox
from localcluster.node.hostregistry import GATEWAY

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

BRIDGE_ADDRESS = str(GATEWAY)     # the host as pods of the process node see it (node/README.md)
SENT_BEFORE_STALL = 256 << 10
ARCHIVE_BYTES = 8 << 20
STALL_SECONDS = 10
# A pod start, the trainer up to its staging, the stall deadline, the second pod's start.
RESTART_TIMEOUT = 120


class StallingArchive(HttpsFileStandIn):
    """Answers HEAD in full; a GET gets its headers and SENT_BEFORE_STALL bytes, the last one 3 s
    after the others (the trainer reports bytes at most every 2 s: the byte that arrives alone, in
    one read, is reported with the total so far), then nothing until the test ends."""

    def __init__(self, folder: Path, host: str) -> None:
        self.release = threading.Event()
        super().__init__(folder, host)

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        data = self.files.get(request.path.lstrip("/"))
        if request.command != "GET" or data is None:
            super().handle(request)
            return
        request.send_response(200)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("Content-Type", "application/octet-stream")
        request.end_headers()
        for part in (data[:SENT_BEFORE_STALL - 1], data[SENT_BEFORE_STALL - 1:SENT_BEFORE_STALL]):
            request.wfile.write(part)
            request.wfile.flush()
            if self.release.wait(3.0):
                return
        self.release.wait(RESTART_TIMEOUT)

    def stop(self) -> None:
        self.release.set()
        super().stop()


@pytest.fixture
def stalling_server(local_cluster, tmp_path):
    # The bridge exists while the node runs, hence the local_cluster fixture first.
    folder = tmp_path / "stall-ca"
    folder.mkdir()
    server = StallingArchive(folder, BRIDGE_ADDRESS)
    try:
        yield server
    finally:
        server.stop()


# slow: ~20 s of a `make test` at its budget; the rule itself is unit-tested in tests/unit/operator/test_staging_phase.py
@pytest.mark.slow
def test_staging_that_stops_restarts_the_gang_with_reason_staging_stalled(
        local_cluster, job_namespace, data_dir, start_operator, stalling_server):
    url = stalling_server.put("sets/cats.tar.gz", bytes(ARCHIVE_BYTES))
    name = "stalls"
    job = sandbox.quickstart_job(data_dir, name)
    spec = job["spec"]
    spec["dataset"]["uri"] = url
    spec["resources"]["numNodes"] = 1
    spec["resources"]["volumes"] += [{"name": "cache", "emptyDir": {}},
                                     {"name": "ca", "hostPath": {"path": str(stalling_server.folder)}}]
    spec["resources"]["volumeMounts"] += [{"name": "cache", "mountPath": "/cache"},
                                          {"name": "ca", "mountPath": "/stall-ca", "readOnly": True}]
    spec["resources"]["env"] += [{"name": "LORAKUBE_CACHE_DIR", "value": "/cache"},
                                 {"name": "SSL_CERT_FILE", "value": "/stall-ca/standin-ca.crt"}]
    spec["runPolicy"].update(maxRestarts=1, backoffSeconds=0, stagingProgressDeadlineSeconds=STALL_SECONDS)

    start_operator()
    started = time.monotonic()
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    seen: list[dict] = []
    while True:
        status = (sandbox.get_job(local_cluster.cluster.kubectl, job_namespace, name) or {}).get("status") or {}
        if not seen or status != seen[-1]:
            seen.append(status)
        if status.get("attempt") == 2 and status.get("phase") == "Staging":
            break                     # the new gang runs and stages again
        assert status.get("phase") != "Failed" and time.monotonic() - started < RESTART_TIMEOUT, \
            json.dumps(status, indent=1)
        time.sleep(0.5)
    took = time.monotonic() - started
    history = "\n".join(json.dumps({k: s.get(k) for k in ("phase", "attempt", "progress", "stagingSeen")})
                        for s in seen)

    # Attempt 1 reported the bytes that did arrive, then nothing more.
    reports = [s["progress"]["staging"] for s in seen if (s.get("progress") or {}).get("staging")]
    assert {"attempt": 1, "input": "dataset", "bytesDone": SENT_BEFORE_STALL, "bytesTotal": ARCHIVE_BYTES} in [
        {k: r.get(k) for k in ("attempt", "input", "bytesDone", "bytesTotal")} for r in reports], history

    # The stall restarted the gang with its own reason, naming where the bytes stopped; it spent a restart.
    where = f"dataset {url} stuck at {SENT_BEFORE_STALL} of {ARCHIVE_BYTES} bytes"
    failure = status["lastFailure"]
    assert failure["reason"] == contract.STAGING_STALLED and failure["pod"] == contract.pod_name(name, 0), failure
    assert where in failure["message"] and f"staged nothing new for {STALL_SECONDS}s" in failure["message"], failure
    # Rank 0's last log lines (read as the stall fired: it still ran) show where the trainer stood.
    last = [line for line in failure.get("logTail", "").splitlines() if f'"event": "{contract.STAGING_EVENT}"' in line]
    assert last and f'"bytesDone": {SENT_BEFORE_STALL}' in last[-1], failure
    assert status["restarts"] == 1
    events = json.loads(local_cluster.kubectl("get", "events", "-n", job_namespace, "-o", "json", check=True).stdout)
    stalled = [e["message"] for e in events["items"]
               if e["reason"] == contract.STAGING_STALLED and e["involvedObject"]["name"] == name]
    assert len(stalled) == 1 and where in stalled[0] and "restarting all pods as attempt 2" in stalled[0], stalled
    # The new gang downloads again: a second GET, from attempt 2's rank 0.
    deadline = time.monotonic() + 30
    while len(stalling_server.downloads()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(stalling_server.downloads()) == 2, stalling_server.requests
    print(f"apply -> stall -> restarted gang staging again in {took:.1f} s")
