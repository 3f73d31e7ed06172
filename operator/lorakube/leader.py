"""Leader election on a coordination.k8s.io/v1 Lease, so several operator replicas never act at once.

The replica that holds the Lease runs the handlers; the others wait to acquire it. The holder
renews every `renew_seconds`; if it cannot renew before the Lease would expire, it stops the
operator and exits, so a replica that lost contact can never overlap with the new leader.
Writes use the Lease's resourceVersion, so two replicas racing for a free Lease cannot both win.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lorakube.pods import parse_time

log = logging.getLogger(__name__)

LEASE_NAME = "lorakube-operator"


@dataclasses.dataclass(frozen=True)
class LeaseTimes:
    duration_seconds: int = 15
    renew_seconds: float = 5.0
    retry_seconds: float = 2.0


def _micro(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def may_take(lease_spec: Mapping[str, Any] | None, me: str, now: dt.datetime) -> bool:
    """True when `me` holds the Lease already, or nobody holds it, or the holder let it expire."""
    if not lease_spec or not lease_spec.get("holderIdentity"):
        return True
    if lease_spec["holderIdentity"] == me:
        return True
    renewed = parse_time(lease_spec.get("renewTime")) or parse_time(lease_spec.get("acquireTime"))
    duration = lease_spec.get("leaseDurationSeconds") or 0
    return renewed is None or (now - renewed).total_seconds() > duration


def claimed_spec(lease_spec: Mapping[str, Any] | None, me: str, now: dt.datetime,
                 times: LeaseTimes) -> dict[str, Any]:
    """The Lease spec after `me` takes or renews it; a change of holder bumps leaseTransitions."""
    lease_spec = dict(lease_spec or {})
    taking_over = lease_spec.get("holderIdentity") != me
    return {
        "holderIdentity": me,
        "leaseDurationSeconds": times.duration_seconds,
        "renewTime": _micro(now),
        "acquireTime": _micro(now) if taking_over else lease_spec.get("acquireTime", _micro(now)),
        "leaseTransitions": int(lease_spec.get("leaseTransitions") or 0) + (1 if taking_over and lease_spec else 0),
    }


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, identity: str,
                 times: LeaseTimes = LeaseTimes()) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.identity = identity
        self.times = times

    def try_claim(self) -> bool:
        """One attempt to take or renew the Lease; False when someone else holds it."""
        now = dt.datetime.now(dt.timezone.utc)
        try:
            lease = self.coordination.read_namespaced_lease(LEASE_NAME, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": LEASE_NAME, "namespace": self.namespace},
                    "spec": claimed_spec(None, self.identity, now, self.times)}
            try:
                self.coordination.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
        current = self.coordination.api_client.sanitize_for_serialization(lease.spec) if lease.spec else {}
        if not may_take(current, self.identity, now):
            return False
        body = {"metadata": {"name": LEASE_NAME, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": claimed_spec(current, self.identity, now, self.times)}
        try:
            self.coordination.replace_namespaced_lease(LEASE_NAME, self.namespace, body)
            return True
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote first
                return False
            raise

    def release(self) -> None:
        """Give the Lease up on a clean exit, so a follower takes over at once rather than after
        the lease duration."""
        try:
            lease = self.coordination.read_namespaced_lease(LEASE_NAME, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            body = {"metadata": {"name": LEASE_NAME, "namespace": self.namespace,
                                 "resourceVersion": lease.metadata.resource_version},
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": self.times.duration_seconds,
                             "leaseTransitions": lease.spec.lease_transitions or 0}}
            self.coordination.replace_namespaced_lease(LEASE_NAME, self.namespace, body)
            log.info("released the lease %s/%s", self.namespace, LEASE_NAME)
        except ApiException as exc:
            log.warning("releasing the lease failed (it expires by itself): %s", exc.reason)

    def wait_until_leader(self, stop: threading.Event) -> bool:
        log.info("waiting for the lease %s/%s as %s", self.namespace, LEASE_NAME, self.identity)
        while not stop.is_set():
            try:
                if self.try_claim():
                    log.info("acquired the lease %s/%s", self.namespace, LEASE_NAME)
                    return True
            except ApiException as exc:
                log.warning("leader election: %s", exc.reason)
            stop.wait(self.times.retry_seconds)
        return False

    def keep_renewing(self, stop: threading.Event, lost: threading.Event) -> None:
        """Renew until `stop`; on failing to renew for a whole lease duration, set `lost`."""
        last_renewed = time.monotonic()
        while not stop.wait(self.times.renew_seconds):
            try:
                if self.try_claim():
                    last_renewed = time.monotonic()
                    continue
                log.error("another replica took the lease %s/%s", self.namespace, LEASE_NAME)
            except ApiException as exc:
                log.warning("renewing the lease failed: %s", exc.reason)
                if time.monotonic() - last_renewed < self.times.duration_seconds:
                    continue
            lost.set()
            return
