"""The operator's Prometheus metrics, in a registry of their own (docs/metrics.md lists each one).

A dedicated registry rather than prometheus-client's global one: /metrics serves exactly what is
documented (plus the standard process_* and python_* collectors), and a test can build a fresh
`OperatorMetrics` to check one update without seeing another test's counts.

Updates happen at the edges: `kube.Kube` counts the pods it really created or deleted and, once a
status write went through, what the decision reported (a gang restart, the time until all pods
ran); the handlers time each reconcile pass, count its errors and record the phase each pass
saw. `reconcile.decide` stays pure: it only returns those facts in its Decision.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import gc_collector, platform_collector, process_collector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lorakube import status as st
from lorakube_api import contract

PREFIX = "lorakube_"
PHASES = (st.PENDING, st.QUEUED, st.CREATED, st.STAGING, st.RUNNING_PHASE, st.RESTARTING, st.SUSPENDED, st.SUCCEEDED_PHASE,
          st.FAILED)
# The failure classes that restart a gang (failures.py): pre-set to 0 so rate() works from the start.
RESTART_REASONS = ("PodDisrupted", "PreflightFailed", "RetryableExit", "GpuHardwareError", "KilledBySignal", "PodLost",
                   "PodDeleted", contract.STAGING_STALLED)
FIRST, LATER = "first", "later"     # the `attempt` label of the time-to-running histogram
# A pass reads one job and writes a few objects: milliseconds, seconds when the API server is slow.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Scheduling, image pulls and container starts: seconds to many minutes (a GPU node scaling up).
STARTUP_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


class JobPhases(Collector):
    """lorakube_jobs{namespace, phase}: the phase each job had when the operator last reconciled
    it (what the pass read anyway; no extra API call). Every phase is reported, 0 included, for
    each namespace that has a job, so an alert on phase="Failed" sees a 0 before the first one."""

    NAME = f"{PREFIX}jobs"
    HELP = "LoRATrainingJobs by namespace and phase, as the acting operator replica last saw them"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        """`phase` None: the job is gone."""
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase

    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            phases = dict(self._phases)
        counts = {(namespace, phase): 0 for namespace, _ in phases for phase in PHASES}
        for (namespace, _), phase in phases.items():
            counts[(namespace, phase)] = counts.get((namespace, phase), 0) + 1
        return counts

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=("namespace", "phase"))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=("namespace", "phase"))
        for (namespace, phase), count in sorted(self.counts().items()):
            family.add_metric((namespace, phase), count)
        yield family


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, standard: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if standard:
            process_collector.ProcessCollector(registry=self.registry)
            platform_collector.PlatformCollector(registry=self.registry)
            gc_collector.GCCollector(registry=self.registry)
        r = self.registry
        self.leader = Gauge(f"{PREFIX}leader", "1 on the replica that acts (holds the lease, or runs "
                            "without leader election), 0 on a follower", registry=r)
        self.leader.set(0)
        self.jobs = JobPhases()
        r.register(self.jobs)
        self.reconcile_seconds = Histogram(
            f"{PREFIX}reconcile_duration_seconds", "Seconds one reconcile pass of one job took (read, decide, "
            "write), failed passes included", buckets=RECONCILE_BUCKETS, registry=r)
        self.reconcile_errors = Counter(
            f"{PREFIX}reconcile_errors", "Reconcile passes that failed, by the exception's class; the job is "
            "looked at again shortly", ("reason",), registry=r)
        self.gang_restarts = Counter(
            f"{PREFIX}gang_restarts", "Gang restarts (all pods of an attempt replaced), by the failure class "
            "that caused them", ("reason",), registry=r)
        for reason in RESTART_REASONS:
            self.gang_restarts.labels(reason)
        self.time_to_running = Histogram(
            f"{PREFIX}job_time_to_running_seconds", "Seconds until all pods of an attempt ran: from the job's "
            "creation for the first attempt, from the attempt's first pod creation for later ones; once per "
            "attempt", ("attempt",), buckets=STARTUP_BUCKETS, registry=r)
        for attempt in (FIRST, LATER):
            self.time_to_running.labels(attempt)
        self.pods_created = Counter(f"{PREFIX}pods_created", "Trainer pods the operator created",
                                    ("namespace",), registry=r)
        self.pods_deleted = Counter(f"{PREFIX}pods_deleted", "Trainer pods the operator deleted (force "
                                    "deletions included; a pod already gone is not counted)", ("namespace",),
                                    registry=r)

    def track_leadership(self, valid: Callable[[], bool]) -> None:
        """The leader gauge reads the replica's leadership at every scrape."""
        self.leader.set_function(lambda: 1.0 if valid() else 0.0)

    def status_written(self, gang_restart: str | None, pods_running: tuple[str, float] | None) -> None:
        """What a decision reported, counted once its status write went through (so a pass that
        failed before writing, and is repeated, counts once)."""
        if gang_restart is not None:
            self.gang_restarts.labels(gang_restart).inc()
        if pods_running is not None:
            attempt, seconds = pods_running
            self.time_to_running.labels(attempt).observe(max(seconds, 0.0))

    def reconcile_failed(self, exc: BaseException) -> None:
        self.reconcile_errors.labels(type(exc).__name__).inc()


# What `lorakube operator` serves on /metrics.
OPERATOR = OperatorMetrics(standard=True)
