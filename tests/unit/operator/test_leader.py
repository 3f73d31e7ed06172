"""Who may take the operator's Lease, and what taking it writes."""

from __future__ import annotations

import datetime as dt

from ltj_fixtures import NOW

from lorakube import leader

TIMES = leader.LeaseTimes(duration_seconds=15)


def held_by(holder: str, renewed_seconds_ago: float) -> dict:
    renewed = NOW - dt.timedelta(seconds=renewed_seconds_ago)
    return {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 2,
            "acquireTime": "2026-05-01T11:00:00.000000Z", "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}


def test_a_free_or_own_lease_may_be_taken():
    assert leader.may_take(None, "me", NOW)
    assert leader.may_take({"holderIdentity": ""}, "me", NOW)
    assert leader.may_take(held_by("me", 1), "me", NOW)


def test_a_lease_renewed_recently_by_another_replica_is_respected():
    assert not leader.may_take(held_by("other", 5), "me", NOW)


def test_an_expired_lease_may_be_taken_over():
    assert leader.may_take(held_by("other", 16), "me", NOW)


def test_taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time():
    taken = leader.claimed_spec(held_by("other", 30), "me", NOW, TIMES)
    assert taken["holderIdentity"] == "me" and taken["leaseTransitions"] == 3
    assert taken["acquireTime"] == taken["renewTime"] == "2026-05-01T12:00:00.000000Z"
    renewed = leader.claimed_spec(taken, "me", NOW + dt.timedelta(seconds=5), TIMES)
    assert renewed["leaseTransitions"] == 3 and renewed["acquireTime"] == taken["acquireTime"]
    assert renewed["renewTime"] == "2026-05-01T12:00:05.000000Z"
    assert leader.claimed_spec(None, "me", NOW, TIMES)["leaseTransitions"] == 0
