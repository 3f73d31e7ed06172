"""When and how soon a container that ended runs again, as kubelet decides it (pure).

Kubelet keeps one back-off entry per container: the first restart happens at once and
records `base`; every further exit waits the recorded back-off (the container is
`CrashLoopBackOff` meanwhile), then doubles it up to `cap`. An exit more than twice the cap
after the previous one (the container ran cleanly for a while) starts over at `base`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BASE_SECONDS = 10.0
DEFAULT_CAP_SECONDS = 300.0
RESTART_POLICIES = ("Always", "OnFailure", "Never")


def should_restart(policy: str, exit_code: int, init: bool = False) -> bool:
    """`Never` keeps the exit; `OnFailure` retries non-zero exits; `Always` retries all.
    Init containers of a restarting pod are retried only when they fail: a successful one
    is done for good."""
    if policy == "Never":
        return False
    if init or policy == "OnFailure":
        return exit_code != 0
    return True


@dataclass(frozen=True)
class BackOffEntry:
    backoff: float  # the wait before the next restart
    last_exit: float  # monotonic time of the exit that recorded it


@dataclass(frozen=True)
class BackOff:
    base: float = DEFAULT_BASE_SECONDS
    cap: float = DEFAULT_CAP_SECONDS

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError(f"restart back-off: need 0 < base <= cap, got base={self.base} "
                             f"cap={self.cap}")

    @property
    def reset_after(self) -> float:
        return 2 * self.cap

    def plan(self, previous: BackOffEntry | None, exited_at: float
             ) -> tuple[float, BackOffEntry]:
        """The wait before restarting a container that exited at `exited_at`, and the entry
        to keep for its next exit."""
        if previous is None or exited_at - previous.last_exit > self.reset_after:
            return 0.0, BackOffEntry(self.base, exited_at)
        return previous.backoff, BackOffEntry(min(previous.backoff * 2, self.cap), exited_at)


def backoff_message(delay: float, container: str, pod: str, namespace: str, uid: str) -> str:
    """The `CrashLoopBackOff` waiting message, worded as kubelet words it."""
    return (f"back-off {delay:g}s restarting failed container={container} "
            f"pod={pod}_{namespace}({uid})")
