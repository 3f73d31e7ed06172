"""docs/metrics.md lists exactly the metrics the code defines, each with its type (the quickstart
e2e test, through tests/e2e/metrics_watch.py, then checks that every listed one is really served
during and after a real job)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from lorakube.metrics import OperatorMetrics
from lorakube_trainer.metrics_server import GAUGES, PREFIX

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(lorakube_\w+)` \| (\w+) \|")


def rows() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for line in DOC.read_text().splitlines() if (m := ROW.match(line))]


def test_every_metric_the_code_defines_is_documented_once_with_its_type():
    registry = CollectorRegistry()
    OperatorMetrics(registry)
    exposed = {(m.name + "_total" if m.type == "counter" else m.name, m.type) for m in registry.collect()}
    exposed |= {(f"{PREFIX}{name}", "gauge") for name, _ in GAUGES}
    listed = rows()
    assert len(listed) == len(set(listed)), "a metric is listed twice"
    assert set(listed) == exposed
