"""localcluster.recorder against the real API server: what the e2e tests record with
LORAKUBE_RECORD_STATUSES (tests/fixtures/job-statuses/) is each real version of a job, trimmed, with
local paths replaced, and nothing for a change that only touches metadata."""

from __future__ import annotations

import json
import time
from pathlib import Path

from localcluster.recorder import WatchRecorder
from lorakube_api import contract
from lorakube_dev import sandbox

LOCAL_DATA = "/var/lib/recorder-test/data"


def wait_for_files(recorder: WatchRecorder, count: int, timeout: float = 30.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while len(recorder.written) < count:
        assert time.monotonic() < deadline, f"recorded {recorder.written}, expected {count} files"
        time.sleep(0.1)
    return list(recorder.written)


def test_the_recorder_writes_each_version_of_a_job_trimmed_and_scrubbed(local_cluster, new_namespace, tmp_path):
    kubectl = local_cluster.cluster.kubectl
    sandbox.install(kubectl, new_namespace)  # the CRD (server-side, as the e2e setup applies it)
    deadline = time.monotonic() + 60
    while local_cluster.kubectl("get", contract.SHORT_NAME, "-n", new_namespace).returncode != 0:
        assert time.monotonic() < deadline, f"kubectl does not know `{contract.SHORT_NAME}` after 60 s"
        time.sleep(0.5)
    recorder = WatchRecorder(local_cluster.kubectl_path, local_cluster.kubeconfig,
                             f"{contract.PLURAL}.{contract.API_GROUP}", new_namespace, tmp_path,
                             {LOCAL_DATA: "/srv/lorakube-data"})
    try:
        sandbox.apply_job(kubectl, new_namespace, sandbox.quickstart_job(Path(LOCAL_DATA), "rec"))
        status = {"status": {"phase": "Running", "attempt": 1,
                             "progress": {"step": 3, "totalSteps": 8, "text": "3/8"}}}
        local_cluster.kubectl("patch", contract.SHORT_NAME, "rec", "-n", new_namespace, "--subresource=status",
                              "--type=merge", "-p", json.dumps(status), check=True)
        # metadata only (as Kopf's annotations and finalizer): not a new version for the recorder
        local_cluster.kubectl("annotate", contract.SHORT_NAME, "rec", "-n", new_namespace, "example.com/x=1",
                              check=True)
        local_cluster.kubectl("patch", contract.SHORT_NAME, "rec", "-n", new_namespace, "--type=merge",
                              "-p", '{"spec":{"runPolicy":{"suspend":true}}}', check=True)
        files = wait_for_files(recorder, 3)
        time.sleep(1)  # the annotation's watch event has long arrived: it must not add a file
    finally:
        recorder.stop()

    assert [f.name for f in recorder.written] == ["001-rec-NoStatus.json", "002-rec-Running.json",
                                                  "003-rec-Running.json"]
    first, running, suspended = (json.loads(f.read_text()) for f in files)
    assert set(first) == {"apiVersion", "kind", "metadata", "spec", "status"} and first["status"] is None
    assert first["metadata"] == {"name": "rec", "generation": 1}
    assert running["status"]["progress"]["text"] == "3/8" and running["metadata"]["generation"] == 1
    assert suspended["metadata"]["generation"] == 2 and suspended["spec"]["runPolicy"]["suspend"] is True
    text = "".join(f.read_text() for f in files)
    assert LOCAL_DATA not in text and '"path": "/srv/lorakube-data"' in text
