"""The operator's Prometheus metrics, in a registry of their own (docs/metrics.md lists each one).

A dedicated registry rather than prometheus-client's global one: /metrics serves exactly what is
documented (plus the standard process_* and python_* collectors), and a test can build a fresh
`OperatorMetrics` to check one update without seeing another test's counts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import gc_collector, platform_collector, process_collector

PREFIX = "lorakube_"


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, standard: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if standard:
            process_collector.ProcessCollector(registry=self.registry)
            platform_collector.PlatformCollector(registry=self.registry)
            gc_collector.GCCollector(registry=self.registry)
        self.leader = Gauge(f"{PREFIX}leader", "1 on the replica that acts (holds the lease, or runs "
                            "without leader election), 0 on a follower", registry=self.registry)
        self.leader.set(0)

    def track_leadership(self, valid: Callable[[], bool]) -> None:
        """The leader gauge reads the replica's leadership at every scrape."""
        self.leader.set_function(lambda: 1.0 if valid() else 0.0)


# What `lorakube operator` serves on /metrics.
OPERATOR = OperatorMetrics(standard=True)
