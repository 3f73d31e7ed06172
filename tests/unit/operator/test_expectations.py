"""kube.Expectations: the pods a pass created count as present, and the pods it deleted as being
deleted, until the pod index shows it."""

from __future__ import annotations

import dataclasses

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


# --- deletions: one DELETE per pod ------------------------------------------------------------

def live(name: str, uid: str, attempt: int = 1) -> PodView:
    return PodView(name=name, rank=int(name[-1]), attempt=attempt, owner_uid="uid-1", phase="Running", uid=uid)


def terminating(pod: PodView, grace: int = 30) -> PodView:
    return dataclasses.replace(pod, deleting=True, deletion_grace_seconds=grace)


def test_a_deleted_pod_shows_as_deleting_until_the_index_shows_the_deletion():
    expected = kube.Expectations(ttl=60, clock=Clock())
    rank0, rank1 = live("job-node-0", "pod-a"), live("job-node-1", "pod-b")
    expected.deleted(KEY, terminating(rank0))
    # The index still shows rank 0 alive: the pass sees it deleting, so it does not delete it again.
    merged = {v.name: v for v in expected.merge(KEY, [rank0, rank1])}
    assert merged["job-node-0"].deleting and merged["job-node-0"].deletion_grace_seconds == 30
    assert not merged["job-node-1"].deleting
    # The index caught up (its view now carries the deletion): the expectation is done.
    later = dataclasses.replace(terminating(rank0), phase="Failed")
    assert expected.merge(KEY, [later, rank1]) == (later, rank1)
    assert expected.merge(KEY, [rank0, rank1]) == (rank0, rank1)   # nothing left to overlay


def test_a_deleted_pod_the_index_no_longer_holds_is_forgotten():
    expected = kube.Expectations(ttl=60, clock=Clock())
    rank0 = live("job-node-0", "pod-a")
    expected.deleted(KEY, terminating(rank0))
    assert expected.merge(KEY, []) == ()
    assert expected.merge(KEY, [rank0]) == (rank0,)


def test_the_deletion_is_keyed_by_uid_so_the_next_attempts_pod_of_the_same_name_is_alive():
    expected = kube.Expectations(ttl=60, clock=Clock())
    old = live("job-node-0", "pod-a", attempt=1)
    expected.deleted(KEY, terminating(old))
    new = live("job-node-0", "pod-z", attempt=2)
    assert expected.merge(KEY, [old, new]) == (terminating(old), new)


def test_a_deletion_the_index_never_shows_expires_so_the_pod_is_deleted_again():
    clock = Clock()
    expected = kube.Expectations(ttl=60, clock=clock)
    rank0 = live("job-node-0", "pod-a")
    expected.deleted(KEY, terminating(rank0))
    clock.now += 59
    assert expected.merge(KEY, [rank0])[0].deleting
    clock.now += 2
    # A lost DELETE (or a watch that missed it): the pod looks alive again and the pass retries.
    assert expected.merge(KEY, [rank0]) == (rank0,)


def test_a_forced_deletion_is_done_only_when_the_index_shows_grace_zero():
    expected = kube.Expectations(ttl=60, clock=Clock())
    stuck = terminating(live("job-node-0", "pod-a"), grace=30)
    expected.deleted(KEY, terminating(stuck, grace=0))
    # The index still shows the graceful deletion: the forced one is not asked for again.
    assert expected.merge(KEY, [stuck])[0].deletion_grace_seconds == 0
    forced = terminating(stuck, grace=0)
    assert expected.merge(KEY, [forced]) == (forced,)
    assert expected.merge(KEY, [stuck]) == (stuck,)


def test_a_created_then_deleted_pod_the_index_has_not_shown_stays_deleting():
    expected = kube.Expectations(ttl=60, clock=Clock())
    made = live("job-node-0", "pod-a")
    expected.created(KEY, made)
    expected.deleted(KEY, terminating(made))
    assert expected.merge(KEY, []) == (terminating(made),)
    expected.forget(KEY)
    assert expected.merge(KEY, []) == ()


def test_a_created_pod_is_found_by_name_and_attempt_until_the_index_shows_it():
    # kube.act deletes the pods a rejected pass created by these views (uid included), so the
    # deletion is remembered like any other.
    expected = kube.Expectations(ttl=60, clock=Clock())
    made = live("job-node-0", "pod-a")
    expected.created(KEY, made)
    assert expected.expected(KEY, "job-node-0", 1) == made
    assert expected.expected(KEY, "job-node-0", 2) is None and expected.expected(("ns", "other"), "job-node-0", 1) is None
    expected.merge(KEY, [made])
    assert expected.expected(KEY, "job-node-0", 1) is None
