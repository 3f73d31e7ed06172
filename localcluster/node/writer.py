"""API writes off the main loop: in order per pod, concurrent across pods, newest status wins.

The loop decides what a pod's status is and which events and deletions follow; waiting for
each of those requests in the loop itself made hundreds of pods take tens of seconds to be
reported Running (each write waits on the apiserver, and the loop starts nothing meanwhile).
Here each pod has its own sequence of jobs, run in submission order by a few threads, so a
pod's final status is always written before its deletion and its events keep their order,
while different pods' writes overlap. A status job waiting behind others is replaced by a newer
one for the same pod: only the latest status is worth sending.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = Callable[[], None]


class KeyedWriter:
    def __init__(self, threads: int, name: str = "writer") -> None:
        self._lock = threading.Condition()
        # key -> jobs not yet started, as (tag, job); a key is in `_ready` or being run by a
        # thread while it has jobs, never both, so its jobs never run concurrently.
        self._pending: dict[str, deque[tuple[str | None, Job]]] = {}
        self._ready: deque[str] = deque()
        self._active: set[str] = set()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
                         for index in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: str, job: Job, replaces: str | None = None) -> None:
        """Queue `job` after `key`'s earlier jobs. With `replaces`, a job of that tag that is the
        last one still waiting for this key is dropped in its favour."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the writer is closed")
            jobs = self._pending.setdefault(key, deque())
            if replaces is not None and jobs and jobs[-1][0] == replaces:
                jobs.pop()
            jobs.append((replaces, job))
            if key not in self._active and key not in self._ready:
                self._ready.append(key)
                self._lock.notify()

    def pending(self) -> int:
        with self._lock:
            return sum(len(jobs) for jobs in self._pending.values()) + len(self._active)

    def close(self, timeout: float) -> bool:
        """Run what was submitted, then stop the threads; False if that took over `timeout`."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._ready and not (self._closed and not self._pending):
                    self._lock.wait()
                if not self._ready:
                    return  # closed and nothing left (the others' keys are theirs to finish)
                key = self._ready.popleft()
                self._active.add(key)
            while True:
                with self._lock:
                    jobs = self._pending.get(key)
                    if not jobs:
                        self._pending.pop(key, None)
                        self._active.discard(key)
                        self._lock.notify_all()
                        break
                    _, job = jobs.popleft()
                try:
                    job()
                except Exception:  # a job reports its own failures; this only keeps the thread
                    log.exception("API write for %s failed", key)
