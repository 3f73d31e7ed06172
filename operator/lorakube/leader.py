"""Leader election on a coordination.k8s.io/v1 Lease, so several operator replicas never act at once.

The rules are client-go's, and every duration is measured on the replica's OWN monotonic clock;
no replica compares its wall clock with a timestamp another replica wrote:

- A follower takes the Lease only when nobody holds it, or when it has seen the same Lease record
  (holder, renewTime, resourceVersion) unchanged for a whole lease duration since it first saw
  that record.
- The leader renews every `retry_seconds`. It may act until `renew_deadline_seconds` after it
  *sent* its last successful renewal (`Leadership`); past that it stops acting and exits.
- renew deadline < lease duration: a leader that cannot renew stops before any follower can
  take over (the difference absorbs clock-rate skew and scheduling delays). A leader that was
  paused (SIGSTOP, a frozen VM) finds on resuming that its deadline passed and acts no more.

Writes use the Lease's resourceVersion, so two replicas racing for a free Lease cannot both win.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

LEASE_NAME = "lorakube-operator"


@dataclasses.dataclass(frozen=True)
class LeaseTimes:
    """client-go's defaults: --leader-elect-lease-duration, -renew-deadline, -retry-period."""

    duration_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_seconds < self.renew_deadline_seconds < self.duration_seconds:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration (got "
                f"{self.retry_seconds:g} s, {self.renew_deadline_seconds:g} s, {self.duration_seconds:g} s): "
                "the leader must give up before a follower may take over")


class NotLeader(RuntimeError):
    """This replica may no longer act: it has not renewed the Lease within its renew deadline."""


class Leadership:
    """Until when this replica may act, on its own monotonic clock. A replica without leader
    election may always act (`Leadership.always()`)."""

    def __init__(self, valid_until: float = -math.inf, clock: Callable[[], float] = time.monotonic) -> None:
        self._valid_until = valid_until
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def always(cls) -> Leadership:
        return cls(math.inf)

    @property
    def valid_until(self) -> float:
        return self._valid_until

    def extend(self, until: float) -> None:
        with self._lock:
            self._valid_until = max(self._valid_until, until)

    def revoke(self) -> None:
        with self._lock:
            self._valid_until = -math.inf

    def valid(self) -> bool:
        return self._clock() < self._valid_until

    def check(self) -> None:
        """Raise NotLeader when this replica may not act now; called before every write."""
        if not self.valid():
            raise NotLeader("not the leader any more: the Lease was not renewed within the renew deadline")


def _micro(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_key(lease: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies one Lease record: any renewal changes it."""
    spec = lease.get("spec") or {}
    return (spec.get("holderIdentity"), spec.get("renewTime"), (lease.get("metadata") or {}).get("resourceVersion"))


@dataclasses.dataclass
class Observed:
    """The Lease record a follower last saw and when it first saw it (monotonic seconds)."""

    key: tuple[Any, ...] | None = None
    since: float = 0.0

    def see(self, lease: Mapping[str, Any], now: float) -> float:
        """Record a sighting; returns for how long this exact record has been seen unchanged."""
        key = record_key(lease)
        if key != self.key:
            self.key, self.since = key, now
        return now - self.since


def may_take(lease: Mapping[str, Any] | None, me: str, unchanged_for: float) -> bool:
    """True when `me` holds the Lease already, or nobody holds it, or its record has not changed
    for a whole lease duration (as the holder wrote it) on this replica's clock."""
    spec = (lease or {}).get("spec") or {}
    holder = spec.get("holderIdentity")
    if not holder or holder == me:
        return True
    return unchanged_for >= float(spec.get("leaseDurationSeconds") or 0)


def claimed_spec(lease_spec: Mapping[str, Any] | None, me: str, now: dt.datetime,
                 times: LeaseTimes) -> dict[str, Any]:
    """The Lease spec after `me` takes or renews it; a change of holder bumps leaseTransitions.
    The times written are informational (for people and kubectl); no replica judges expiry by them."""
    lease_spec = dict(lease_spec or {})
    taking_over = lease_spec.get("holderIdentity") != me
    return {
        "holderIdentity": me,
        "leaseDurationSeconds": math.ceil(times.duration_seconds),
        "renewTime": _micro(now),
        "acquireTime": _micro(now) if taking_over else lease_spec.get("acquireTime", _micro(now)),
        "leaseTransitions": int(lease_spec.get("leaseTransitions") or 0) + (1 if taking_over and lease_spec else 0),
    }


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, identity: str,
                 times: LeaseTimes = LeaseTimes(), clock: Callable[[], float] = time.monotonic) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.identity = identity
        self.times = times
        self.clock = clock
        self.leadership = Leadership(clock=clock)
        self.observed = Observed()

    def _timeout(self) -> float:
        # As client-go: one Lease call may take up to the renew deadline. A renewal that hangs
        # longer cannot keep the leader acting: watch_deadline enforces the deadline meanwhile.
        return self.times.renew_deadline_seconds

    def try_claim(self) -> bool:
        """One attempt to take or renew the Lease; False when someone else holds it. On success,
        this replica may act until the renew deadline counted from when the attempt started."""
        started = self.clock()
        now = dt.datetime.now(dt.timezone.utc)
        timeout = self._timeout()
        try:
            lease = self.coordination.read_namespaced_lease(LEASE_NAME, self.namespace, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": LEASE_NAME, "namespace": self.namespace},
                    "spec": claimed_spec(None, self.identity, now, self.times)}
            try:
                self.coordination.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
            self.leadership.extend(started + self.times.renew_deadline_seconds)
            return True
        current = self.coordination.api_client.sanitize_for_serialization(lease)
        unchanged_for = self.observed.see(current, self.clock())
        if not may_take(current, self.identity, unchanged_for):
            return False
        body = {"metadata": {"name": LEASE_NAME, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": claimed_spec(current.get("spec"), self.identity, now, self.times)}
        try:
            self.coordination.replace_namespaced_lease(LEASE_NAME, self.namespace, body, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote first
                return False
            raise
        self.leadership.extend(started + self.times.renew_deadline_seconds)
        return True

    def release(self) -> None:
        """Give the Lease up on a clean exit, so a follower takes over at once rather than after
        the lease duration."""
        try:
            lease = self.coordination.read_namespaced_lease(LEASE_NAME, self.namespace,
                                                            _request_timeout=self._timeout())
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            body = {"metadata": {"name": LEASE_NAME, "namespace": self.namespace,
                                 "resourceVersion": lease.metadata.resource_version},
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": math.ceil(self.times.duration_seconds),
                             "leaseTransitions": lease.spec.lease_transitions or 0}}
            self.coordination.replace_namespaced_lease(LEASE_NAME, self.namespace, body,
                                                       _request_timeout=self._timeout())
            log.info("released the lease %s/%s", self.namespace, LEASE_NAME)
        except Exception as exc:  # noqa: BLE001 - best effort: the lease expires by itself
            log.warning("releasing the lease failed (it expires by itself): %s", exc)

    def wait_until_leader(self, stop: threading.Event, on_round: Callable[[], None] = lambda: None) -> bool:
        """Try every retry period until this replica holds the Lease (True) or `stop` (False).
        `on_round` is called after every attempt, failed or not: the replica's liveness."""
        log.info("waiting for the lease %s/%s as %s", self.namespace, LEASE_NAME, self.identity)
        while not stop.is_set():
            try:
                if self.try_claim():
                    log.info("acquired the lease %s/%s as %s", self.namespace, LEASE_NAME, self.identity)
                    return True
            except Exception as exc:  # noqa: BLE001 - an API error or a timeout: try again
                log.warning("leader election: %s", exc)
            on_round()
            stop.wait(self.times.retry_seconds)
        return False

    def keep_renewing(self, stop: threading.Event, lost: threading.Event) -> None:
        """Renew every retry period until `stop`. Sets `lost` (and revokes the leadership) when
        another replica holds the Lease or the renew deadline passed without a renewal."""
        while not stop.wait(self.times.retry_seconds) and not lost.is_set():
            try:
                if self.try_claim():
                    continue
                log.error("another replica took the lease %s/%s", self.namespace, LEASE_NAME)
            except Exception as exc:  # noqa: BLE001 - an API error or a timeout: retry until the deadline
                log.warning("renewing the lease failed: %s", exc)
                if self.leadership.valid():
                    continue
                log.error("the lease %s/%s was not renewed within the renew deadline (%g s)",
                          self.namespace, LEASE_NAME, self.times.renew_deadline_seconds)
            self.leadership.revoke()
            lost.set()
            return

    def watch_deadline(self, stop: threading.Event, lost: threading.Event, interval: float = 0.05) -> None:
        """Set `lost` as soon as the leadership lapses, independently of the renewal (which may be
        stuck in a call). After a pause (SIGSTOP) this wakes at once: its wait has long timed out."""
        while not stop.wait(interval) and not lost.is_set():
            if not self.leadership.valid():
                log.error("the lease %s/%s was not renewed within the renew deadline (%g s)",
                          self.namespace, LEASE_NAME, self.times.renew_deadline_seconds)
                self.leadership.revoke()
                lost.set()
                return
