"""Is this operator replica alive, and is it ready? What /healthz and /readyz answer.

Every replica answers, leader or not: the HTTP server starts before leader election, so a
Deployment's probes see followers too. The answers are computed from facts the replica records
as it goes (pure, on an injected monotonic clock, so every case is a unit test):

- Alive: the loop that matters for the replica's role made progress recently. A follower's is
  the lease loop (`LeaderElector.wait_until_leader`, one round per retry period); the acting
  replica's is Kopf's asyncio loop, where a small task ticks every second. A loop that has not
  moved for `stale_after` seconds is stuck (a deadlock, a call that never returns), and a
  restart is the cure. A replica whose Kopf run has ended is not alive either.
- Ready: the replica has reached the API server once with its credentials and found the
  LoRATrainingJob API there (a follower is ready too: it is a healthy standby, and a
  Deployment with 2 replicas becomes Available only when both are Ready). Ready stays true
  from then on; losing the API server later shows in liveness (the lease loop cannot renew,
  the leader exits) rather than in readiness.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

STARTING, FOLLOWER, LEADER, STOPPED = "starting", "follower", "leader", "stopped"
# How often the acting replica's Kopf loop ticks (see `tick_forever`).
TICK_SECONDS = 1.0
# The least time without progress that counts as stuck. A follower's lease round may take two
# API calls of up to the renew deadline each, plus the retry period: the CLI raises the limit to
# cover that (`stale_limit`).
MIN_STALE_SECONDS = 30.0


def stale_limit(renew_deadline_seconds: float, retry_seconds: float) -> float:
    """Seconds without progress after which a replica counts as stuck: at least two whole lease
    rounds (a read and a write of up to the renew deadline each, then the retry wait)."""
    return max(MIN_STALE_SECONDS, 2 * (2 * renew_deadline_seconds + retry_seconds))


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str

    @property
    def http_status(self) -> int:
        return 200 if self.ok else 503


class Health:
    """Facts about this replica, recorded from several threads; answers computed on demand."""

    def __init__(self, stale_after: float = MIN_STALE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after = stale_after
        self.clock = clock
        self._lock = threading.Lock()
        self._role = STARTING
        self._last_progress = clock()
        self._api_reached_at: float | None = None
        self._api_error: str | None = None

    @property
    def role(self) -> str:
        return self._role

    # --- facts -------------------------------------------------------------------------------

    def following(self) -> None:
        """Leader election started: this replica waits for the lease."""
        self._set_role(FOLLOWER)

    def leading(self) -> None:
        """This replica acts (it holds the lease, or runs without leader election): Kopf starts."""
        self._set_role(LEADER)

    def stopped(self) -> None:
        """Kopf's run ended; the process is on its way out."""
        self._set_role(STOPPED)

    def progress(self) -> None:
        """The role's loop went round once (a lease attempt, a tick of Kopf's loop)."""
        with self._lock:
            self._last_progress = self.clock()

    def api_reached(self) -> None:
        with self._lock:
            if self._api_reached_at is None:
                self._api_reached_at = self.clock()
            self._api_error = None

    def api_failed(self, reason: str) -> None:
        with self._lock:
            self._api_error = reason

    def _set_role(self, role: str) -> None:
        with self._lock:
            self._role = role
            # A new role's loop starts now: its staleness counts from here.
            self._last_progress = self.clock()

    # --- answers -----------------------------------------------------------------------------

    def liveness(self) -> Verdict:
        with self._lock:
            role, idle = self._role, self.clock() - self._last_progress
        if role == STOPPED:
            return Verdict(False, "stopped: the operator's Kopf run has ended")
        loop = {STARTING: "startup", FOLLOWER: "the lease loop (waiting for the lease)",
                LEADER: "Kopf's event loop"}[role]
        if idle > self.stale_after:
            return Verdict(False, f"{role}: {loop} has made no progress for {idle:.0f} s "
                                  f"(limit {self.stale_after:.0f} s)")
        return Verdict(True, f"{role}: {loop} made progress {idle:.1f} s ago")

    def readiness(self) -> Verdict:
        with self._lock:
            role, reached, error = self._role, self._api_reached_at, self._api_error
        if role == STOPPED:
            return Verdict(False, "stopped: the operator's Kopf run has ended")
        if reached is None:
            why = f": {error}" if error else ""
            return Verdict(False, f"{role}: has not reached the API server yet{why}")
        return Verdict(True, f"{role}: reached the API server")


async def tick_forever(health: Health, interval: float = TICK_SECONDS) -> None:
    """Runs in Kopf's event loop: each tick proves the loop still runs its tasks."""
    import asyncio

    while True:
        health.progress()
        await asyncio.sleep(interval)
