"""Scrapes the metrics a user scrapes while a real e2e job runs, and checks them after it: the
operator's /metrics (the sandbox operator listens on a loopback port) and rank 0's trainer
endpoint, reached at the pod's IP over the process node's bridge, as Prometheus would reach it in
a cluster. It rides on a job another test runs (the quickstart), so it costs no job of its own.

Every metric listed in docs/metrics.md must be served: the tables are read from the doc, so the
documentation and the code cannot drift apart (tests/unit/test_metrics_doc.py holds the tables
equal to what the code defines)."""

from __future__ import annotations

import math
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from lorakube import status as st
from lorakube_api import contract
from lorakube_dev import sandbox

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(lorakube_\w+)` \| (gauge|counter|histogram) \|")
Families = dict[str, dict[str, Any]]


def documented() -> dict[str, dict[str, str]]:
    """{"Operator": {name: type}, "Trainer": {name: type}} from the doc's tables."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].split(" (")[0], {})
        elif (row := ROW.match(line)) and current is not None:
            current[row.group(1)] = row.group(2)
    return sections


def scrape(url: str) -> Families | None:
    """{family: {"type": ..., "samples": {(sample name, sorted labels): value}}}, None if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return {f.name: {"type": f.type, "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value
                                                  for s in f.samples}}
            for f in text_string_to_metric_families(text)}


def value(families: Families, sample: str, **labels: str) -> float | None:
    key = (sample, tuple(sorted(labels.items())))
    return next((f["samples"][key] for f in families.values() if key in f["samples"]), None)


def assert_all_served(families: Families, wanted: dict[str, str], where: str) -> None:
    def family(name: str, kind: str) -> str:
        return name.removesuffix("_total") if kind == "counter" else name

    missing = {name: kind for name, kind in wanted.items() if families.get(family(name, kind), {}).get("type") != kind}
    assert not missing, f"listed in docs/metrics.md but not served by {where} (or as another type): {missing}"


class MetricsWatch:
    """Call `on_status` with each status the test polls while the job runs, `check` after it."""

    def __init__(self, local_cluster: Any, operator: sandbox.OperatorProcess, namespace: str, job: str) -> None:
        self.cluster, self.operator, self.namespace, self.job = local_cluster, operator, namespace, job
        self.started = time.monotonic()
        self.rank0_ip: str | None = None
        self.operator_during: Families | None = None
        self.trainer_during: Families | None = None

    def on_status(self, status: dict[str, Any]) -> None:
        if status.get("phase") == st.RUNNING_PHASE and self.operator_during is None:
            scraped = scrape(f"{self.operator.http_url}/metrics")
            if scraped and value(scraped, "lorakube_jobs", namespace=self.namespace, phase="Running") == 1:
                self.operator_during = scraped
        if self.trainer_during is None:
            if self.rank0_ip is None:
                result = self.cluster.kubectl("get", "pod", contract.pod_name(self.job, 0), "-n", self.namespace,
                                              "-o", "jsonpath={.status.podIP}")
                self.rank0_ip = result.stdout.strip() or None
            if self.rank0_ip is not None:
                scraped = scrape(f"http://{self.rank0_ip}:{contract.TRAINER_METRICS_PORT}/metrics")
                if scraped and (value(scraped, "lorakube_trainer_step") or 0) >= 1:
                    self.trainer_during = scraped

    def check(self, total_steps: int) -> None:
        docs = documented()
        # rank 0's endpoint while it trained: a real step and its loss, every documented gauge
        trainer = self.trainer_during
        assert trainer is not None, "rank 0's /metrics never showed a step while the job ran"
        assert_all_served(trainer, docs["Trainer"], "rank 0")
        assert 1 <= value(trainer, "lorakube_trainer_step") <= total_steps
        assert value(trainer, "lorakube_trainer_total_steps") == total_steps
        loss = value(trainer, "lorakube_trainer_loss")
        assert math.isfinite(loss) and loss > 0, loss
        assert value(trainer, "lorakube_trainer_gpu_memory_peak_bytes") == 0     # CPU

        # the operator's endpoint during the job ...
        assert self.operator_during is not None, "the operator's /metrics never showed the job Running"
        assert_all_served(self.operator_during, docs["Operator"], "the operator during the job")
        assert value(self.operator_during, "lorakube_leader") == 1

        # ... and after it: the pass that wrote Succeeded records it once its writes are done,
        # which may be a moment after the test read the phase
        ns = self.namespace
        deadline = time.monotonic() + 30
        while True:
            after = scrape(f"{self.operator.http_url}/metrics")
            if after and value(after, "lorakube_jobs", namespace=ns, phase="Succeeded") == 1:
                break
            assert time.monotonic() < deadline, "lorakube_jobs never showed the job Succeeded"
            time.sleep(0.3)
        assert_all_served(after, docs["Operator"], "the operator after the job")
        for other in ("Pending", "Created", "Running", "Restarting", "Failed", "Suspended"):
            assert value(after, "lorakube_jobs", namespace=ns, phase=other) == 0, other
        assert value(after, "lorakube_pods_created_total", namespace=ns) >= 2
        assert value(after, "lorakube_reconcile_duration_seconds_count") > 0
        assert value(after, "lorakube_job_time_to_running_seconds_count", attempt="first") == 1
        waited = value(after, "lorakube_job_time_to_running_seconds_sum", attempt="first")
        # from the job's creation (stamped to the second, after this watch began) to all pods running
        assert 0 < waited <= time.monotonic() - self.started + 1, waited
        assert value(after, "lorakube_gang_restarts_total", reason="RetryableExit") == 0
