"""The process node's keyed writer: a pod's writes run in order, never two at once, while other
pods' writes overlap; a status still waiting is replaced by a newer one; close() runs what was
submitted."""

from __future__ import annotations

import threading
import time

from localcluster.node.writer import KeyedWriter


def test_jobs_of_one_key_run_in_order_and_one_at_a_time() -> None:
    writer = KeyedWriter(threads=4)
    seen: list[int] = []
    running = []

    def job(index: int) -> None:
        running.append(index)
        assert len(running) == 1, "two jobs of one key ran at once"
        time.sleep(0.001)
        seen.append(index)
        running.remove(index)

    for index in range(50):
        writer.submit("pod-a", lambda index=index: job(index))
    assert writer.close(timeout=10)
    assert seen == list(range(50))


def test_a_slow_key_does_not_hold_back_the_others() -> None:
    writer = KeyedWriter(threads=2)
    release = threading.Event()
    done: list[str] = []
    writer.submit("slow", lambda: release.wait(10) and done.append("slow"))
    for name in ("b", "c", "d"):
        writer.submit(name, lambda name=name: done.append(name))
    deadline = time.monotonic() + 5
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == ["b", "c", "d"]
    release.set()
    assert writer.close(timeout=10)
    assert done[-1] == "slow"


def test_a_waiting_status_is_replaced_by_a_newer_one_but_other_jobs_stay() -> None:
    writer = KeyedWriter(threads=1)
    gate = threading.Event()
    sent: list[str] = []
    writer.submit("block", lambda: gate.wait(10))  # keeps the only thread busy meanwhile
    writer.submit("pod", lambda: sent.append("status 1"), replaces="status")
    writer.submit("pod", lambda: sent.append("status 2"), replaces="status")
    writer.submit("pod", lambda: sent.append("event"))
    writer.submit("pod", lambda: sent.append("status 3"), replaces="status")
    writer.submit("pod", lambda: sent.append("delete"))
    gate.set()
    assert writer.close(timeout=10)
    # status 1 was superseded while waiting; the event kept its place, after status 2.
    assert sent == ["status 2", "event", "status 3", "delete"]


def test_a_failing_job_does_not_stop_the_writer() -> None:
    writer = KeyedWriter(threads=1)
    sent: list[str] = []

    def fail() -> None:
        raise OSError("connection refused")

    writer.submit("pod", fail)
    writer.submit("pod", lambda: sent.append("after"))
    assert writer.close(timeout=10)
    assert sent == ["after"]
