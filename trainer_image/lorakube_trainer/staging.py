"""Rank 0's staging reports: which input it stages into its node's cache and how many bytes are in.

Each report is a contract.Staging: a JSON line on stdout and, when the pod may (progress.py's
LORAKUBE_REPORT_PROGRESS), a merge patch of status.progress.staging and progress.text. The operator
shows the job as Staging until a report of the current attempt says `complete`, then Running.

Reports are throttled (contract.STAGING_REPORT_INTERVAL_SECONDS) except the first of each input
and its last; the last one of the attempt (`complete`) is retried through API trouble like the
last training step, since nothing after it would end the Staging phase.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Mapping, TextIO

from lorakube_api import contract

from .input_cache import Throttle
from .progress import FINAL_WRITE_ATTEMPTS, StatusPatcher, api_target_from_env


# A staging report must not hold the download up for long when the API server is slow.
PATCH_TIMEOUT_S = 5.0


class StagingReporter:
    def __init__(self, attempt: int, *, patcher: StatusPatcher | None = None, out: TextIO | None = None,
                 interval_s: float = contract.STAGING_REPORT_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attempt = attempt
        self.patcher = patcher
        self.out = out if out is not None else sys.stdout
        self.interval_s = interval_s
        self.clock = clock
        self.sent: list[contract.Staging] = []     # what was reported, for logs and tests
        self._input = ""
        self._uri = ""
        self._throttle = Throttle(interval_s, clock)
        self._fetched = False
        self._last: tuple[int, int | None] = (0, None)

    def begin(self, name: str, uri: str) -> None:
        """A new input: reported at once (0 bytes, size not known yet)."""
        self._input, self._uri, self._fetched = name, uri, False
        self._throttle = Throttle(self.interval_s, self.clock)
        self._last = (0, None)
        self._send(0, None, cached=False, complete=False)

    def on_bytes(self, done: int, total: int | None) -> None:
        """The downloaders' callback (input_cache.ByteProgress): rate-limited reports."""
        self._fetched = True
        if (done, total) == self._last:
            return
        self._last = (done, total)
        if self._throttle.due():
            self._send(done, total, cached=False, complete=False)

    def end(self, total: int, complete: bool) -> None:
        """The input is staged (`total` bytes); `complete`: it was the attempt's last one. After a
        download the last report is the download's own total, so bytesDone never goes back (an
        https:// archive is larger than the folder it extracts to)."""
        if self._fetched and self._last[1] is not None:
            total = self._last[1]
        self._send(total, total, cached=not self._fetched, complete=complete,
                   attempts=FINAL_WRITE_ATTEMPTS if complete else 1)

    def _send(self, done: int, total: int | None, *, cached: bool, complete: bool, attempts: int = 1) -> None:
        report = contract.Staging(attempt=self.attempt, input=self._input, uri=self._uri, bytesDone=done,
                                  bytesTotal=total, cached=cached, complete=complete,
                                  updatedAt=contract.utc_now_iso())
        self.sent.append(report)
        print(report.to_json_line(), file=self.out, flush=True)
        if self.patcher is not None:
            self.patcher.patch_status({"progress": report.to_status()}, attempts)


def reporter_from_env(env: Mapping[str, str] | None = None) -> StagingReporter:
    env = os.environ if env is None else env
    try:
        attempt = int(env.get(contract.ENV_ATTEMPT) or 1)
    except ValueError:
        attempt = 1
    target = api_target_from_env(env)
    patcher = None if target is None else StatusPatcher(target, timeout_s=PATCH_TIMEOUT_S)
    return StagingReporter(attempt, patcher=patcher)
