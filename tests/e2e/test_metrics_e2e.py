"""The metrics a user scrapes, during and after a real job: the operator's /metrics (run as its
own process, as in the other e2e tests) and rank 0's trainer endpoint, reached at the pod's IP
over the process node's bridge, as Prometheus would reach it in a cluster.

Every metric listed in docs/metrics.md must be served: the test reads the doc's tables, so the
documentation and the code cannot drift apart."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorakube import status as st
from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(lorakube_\w+)` \| (gauge|counter|histogram) \|")
JOB_TIMEOUT = 300
STEPS = 4


def documented() -> dict[str, dict[str, str]]:
    """{"Operator": {name: type}, "Trainer ...": {name: type}} from the doc's tables."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].split(" (")[0], {})
        elif (row := ROW.match(line)) and current is not None:
            current[row.group(1)] = row.group(2)
    return sections


def family_name(name: str, kind: str) -> str:
    return name.removesuffix("_total") if kind == "counter" else name


def scrape(url: str) -> dict[str, dict] | None:
    """{family name: {"type": ..., "samples": {(sample name, sorted labels): value}}}, or None."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return {f.name: {"type": f.type, "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value
                                                  for s in f.samples}}
            for f in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str, **labels: str) -> float | None:
    return families.get(family, {}).get("samples", {}).get((sample, tuple(sorted(labels.items()))))


def assert_all_documented_served(families: dict, wanted: dict[str, str]) -> None:
    missing = {name: kind for name, kind in wanted.items()
               if families.get(family_name(name, kind), {}).get("type") != kind}
    assert not missing, f"documented in docs/metrics.md but not served (or another type): {missing}"


def test_metrics_are_served_during_and_after_a_real_job(local_cluster, job_namespace, data_dir, start_operator):
    docs = documented()
    operator = start_operator()
    name = "metered"
    kubectl = local_cluster.cluster.kubectl
    # As small as a real job gets: 4 steps, one validation prompt, one LoRA format.
    job = sandbox.quickstart_job(data_dir, name, output={"formats": ["diffusers"]},
                                 training={"stepsPerEpoch": STEPS, "checkpointEverySteps": 0,
                                           "validationPrompts": ["a red circle on a white background"]})
    started = time.monotonic()
    sandbox.apply_job(kubectl, job_namespace, job)

    during_operator = during_trainer = None
    rank0_ip = None
    phase = None
    deadline = time.monotonic() + JOB_TIMEOUT
    while phase not in st.TERMINAL_PHASES:
        assert time.monotonic() < deadline, f"job {name} not finished after {JOB_TIMEOUT} s (phase {phase})"
        body = sandbox.get_job(kubectl, job_namespace, name) or {}
        phase = (body.get("status") or {}).get("phase")
        if phase == st.RUNNING_PHASE and during_operator is None:
            scraped = scrape(f"{operator.http_url}/metrics")
            if scraped and value(scraped, "lorakube_jobs", "lorakube_jobs", namespace=job_namespace,
                                 phase="Running") == 1:
                during_operator = scraped
        if rank0_ip is None:
            result = kubectl("get", "pod", contract.pod_name(name, 0), "-n", job_namespace,
                             "-o", "jsonpath={.status.podIP}")
            rank0_ip = result.stdout.strip() or None
        if rank0_ip and during_trainer is None:
            scraped = scrape(f"http://{rank0_ip}:{contract.TRAINER_METRICS_PORT}/metrics")
            step = scraped and value(scraped, "lorakube_trainer_step", "lorakube_trainer_step")
            if step and step >= 1:
                during_trainer = scraped
        time.sleep(0.3)
    assert phase == st.SUCCEEDED_PHASE, json.dumps(body.get("status"), indent=1)

    # rank 0's endpoint, while it trained: step and loss of a real step, every documented gauge
    assert during_trainer is not None, "rank 0's /metrics never showed a step while the job ran"
    assert_all_documented_served(during_trainer, docs["Trainer"])
    assert 1 <= value(during_trainer, "lorakube_trainer_step", "lorakube_trainer_step") <= STEPS
    assert value(during_trainer, "lorakube_trainer_total_steps", "lorakube_trainer_total_steps") == STEPS
    loss = value(during_trainer, "lorakube_trainer_loss", "lorakube_trainer_loss")
    assert math.isfinite(loss) and loss > 0
    assert value(during_trainer, "lorakube_trainer_gpu_memory_peak_bytes", "lorakube_trainer_gpu_memory_peak_bytes") == 0

    # the operator's endpoint during the job ...
    assert during_operator is not None, "the operator's /metrics never showed the job Running"
    assert_all_documented_served(during_operator, docs["Operator"])
    assert value(during_operator, "lorakube_leader", "lorakube_leader") == 1

    # ... and after it
    def final() -> dict | None:
        scraped = scrape(f"{operator.http_url}/metrics")
        succeeded = scraped and value(scraped, "lorakube_jobs", "lorakube_jobs", namespace=job_namespace,
                                      phase="Succeeded")
        return scraped if succeeded == 1 else None

    after = sandbox_wait(final, "the operator's jobs gauge to show the job Succeeded")
    assert_all_documented_served(after, docs["Operator"])
    for other in ("Pending", "Created", "Running", "Restarting", "Failed", "Suspended"):
        assert value(after, "lorakube_jobs", "lorakube_jobs", namespace=job_namespace, phase=other) == 0
    assert value(after, "lorakube_pods_created", "lorakube_pods_created_total", namespace=job_namespace) >= 2
    assert value(after, "lorakube_reconcile_duration_seconds", "lorakube_reconcile_duration_seconds_count") > 0
    first = value(after, "lorakube_job_time_to_running_seconds", "lorakube_job_time_to_running_seconds_count",
                  attempt="first")
    assert first >= 1, "the first attempt's time to running was not observed"
    waited = value(after, "lorakube_job_time_to_running_seconds", "lorakube_job_time_to_running_seconds_sum",
                   attempt="first")
    # from the job's creation (stamped to the second, after `started`) to all pods running
    assert first == 1 and 0 < waited <= time.monotonic() - started + 1
    assert value(after, "lorakube_gang_restarts", "lorakube_gang_restarts_total", reason="RetryableExit") == 0
    print(f"job ran {time.monotonic() - started:.1f} s; time to running {waited / first:.1f} s")


def sandbox_wait(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
