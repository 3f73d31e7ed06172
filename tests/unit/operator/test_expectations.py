"""kube.Expectations: the pods a pass created count as present until the pod index shows them."""

from __future__ import annotations

from lorakube import kube
from lorakube.pods import PodView

KEY = ("ns", "job")


def view(name: str, attempt: int = 1, owner: str = "uid-1", phase: str = "Pending") -> PodView:
    return PodView(name=name, rank=int(name[-1]), attempt=attempt, owner_uid=owner, phase=phase)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_created_pod_counts_until_the_index_shows_it():
    clock = Clock()
    expected = kube.Expectations(ttl=60, clock=clock)
    expected.created(KEY, view("job-node-0"))
    expected.created(KEY, view("job-node-1"))
    assert {v.name for v in expected.merge(KEY, [])} == {"job-node-0", "job-node-1"}
    # The index caught up with rank 0 (now Running): its view wins, rank 1 is still expected.
    merged = expected.merge(KEY, [view("job-node-0", phase="Running")])
    assert sorted((v.name, v.phase) for v in merged) == [("job-node-0", "Running"), ("job-node-1", "Pending")]
    # Once seen, a pod is the index's alone: deleted later, it is not brought back.
    expected.merge(KEY, [view("job-node-1")])
    assert expected.merge(KEY, []) == ()


def test_a_pod_of_an_earlier_attempt_with_the_same_name_does_not_count_as_seen():
    expected = kube.Expectations(ttl=60, clock=Clock())
    expected.created(KEY, view("job-node-0", attempt=2))
    merged = expected.merge(KEY, [view("job-node-0", attempt=1, phase="Failed")])
    assert sorted((v.attempt, v.phase) for v in merged) == [(1, "Failed"), (2, "Pending")]


def test_an_expectation_the_index_never_meets_expires():
    clock = Clock()
    expected = kube.Expectations(ttl=60, clock=clock)
    expected.created(KEY, view("job-node-0"))
    clock.now += 61
    assert expected.merge(KEY, []) == ()


def test_only_the_version_of_the_last_status_write_is_the_operators_own():
    expected = kube.Expectations()
    expected.wrote(KEY, "41")
    assert expected.is_own_write(KEY, "41")
    assert not expected.is_own_write(KEY, "42")      # someone changed the job after our write
    assert not expected.is_own_write(("ns", "other"), "41")
    expected.forget(KEY)
    assert not expected.is_own_write(KEY, "41")
