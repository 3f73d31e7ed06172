"""Who may take the operator's Lease, judged on the replica's own monotonic clock, and what
taking it writes."""

from __future__ import annotations

import datetime as dt

import pytest
from ltj_fixtures import NOW

from lorakube import leader

TIMES = leader.LeaseTimes(duration_seconds=15, renew_deadline_seconds=10, retry_seconds=2)


def lease(holder: str | None, renew_time: str = "2026-05-01T11:59:59.000000Z", version: str = "7") -> dict:
    return {"metadata": {"resourceVersion": version},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 2,
                     "acquireTime": "2026-05-01T11:00:00.000000Z", "renewTime": renew_time}}


def test_a_free_or_own_lease_may_be_taken():
    assert leader.may_take(None, "me", 0)
    assert leader.may_take(lease(""), "me", 0)
    assert leader.may_take(lease(None), "me", 0)
    assert leader.may_take(lease("me"), "me", 0)


def test_another_holder_is_respected_until_its_record_went_unchanged_for_a_lease_duration():
    observed = leader.Observed()
    held = lease("other")
    assert not leader.may_take(held, "me", observed.see(held, now=100.0))
    assert not leader.may_take(held, "me", observed.see(held, now=114.9))
    assert leader.may_take(held, "me", observed.see(held, now=115.0))


def test_a_renewal_restarts_the_followers_count():
    observed = leader.Observed()
    observed.see(lease("other", version="7"), now=100.0)
    renewed = lease("other", renew_time="2026-05-01T12:00:09.000000Z", version="8")
    assert observed.see(renewed, now=114.0) == 0
    assert not leader.may_take(renewed, "me", observed.see(renewed, now=128.0))
    assert leader.may_take(renewed, "me", observed.see(renewed, now=129.0))


def test_expiry_is_never_judged_by_the_holders_wall_clock():
    # A renewTime an hour in the past (the holder's clock is behind, or ours is ahead) does not
    # let a follower take over at first sight: it must watch the record for a lease duration.
    # Before the fix, may_take compared renewTime with this replica's wall clock and said yes.
    stale_looking = lease("other", renew_time="2026-05-01T11:00:00.000000Z")
    assert not leader.may_take(stale_looking, "me", leader.Observed().see(stale_looking, now=5.0))


def test_the_renew_deadline_must_be_shorter_than_the_lease_duration():
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        leader.LeaseTimes(duration_seconds=10, renew_deadline_seconds=10, retry_seconds=2)
    with pytest.raises(ValueError, match="retry period < renew deadline"):
        leader.LeaseTimes(duration_seconds=15, renew_deadline_seconds=2, retry_seconds=2)
    assert leader.LeaseTimes() == leader.LeaseTimes(15, 10, 2)  # client-go's defaults


def test_leadership_lapses_at_its_deadline_on_the_monotonic_clock():
    clock = [100.0]
    leadership = leader.Leadership(clock=lambda: clock[0])
    assert not leadership.valid()  # nothing renewed yet
    leadership.extend(110.0)
    assert leadership.valid()
    leadership.check()
    clock[0] = 110.0  # e.g. resumed after a SIGSTOP: the monotonic clock kept running
    assert not leadership.valid()
    with pytest.raises(leader.NotLeader):
        leadership.check()
    leadership.extend(120.0)
    leadership.revoke()
    assert not leadership.valid()
    assert leader.Leadership.always().valid()


def test_taking_over_counts_a_transition_and_renewing_keeps_the_acquire_time():
    taken = leader.claimed_spec(lease("other")["spec"], "me", NOW, TIMES)
    assert taken["holderIdentity"] == "me" and taken["leaseTransitions"] == 3
    assert taken["leaseDurationSeconds"] == 15
    assert taken["acquireTime"] == taken["renewTime"] == "2026-05-01T12:00:00.000000Z"
    renewed = leader.claimed_spec(taken, "me", NOW + dt.timedelta(seconds=5), TIMES)
    assert renewed["leaseTransitions"] == 3 and renewed["acquireTime"] == taken["acquireTime"]
    assert renewed["renewTime"] == "2026-05-01T12:00:05.000000Z"
    assert leader.claimed_spec(None, "me", NOW, TIMES)["leaseTransitions"] == 0


def test_a_restarted_instance_waits_out_the_lease_its_previous_instance_held():
    # Same pod name, new process (the container restarted after a crash): not a renewal.
    held = lease("me")
    observed = leader.Observed()
    assert not leader.may_take(held, "me", observed.see(held, now=100.0), holding=False)
    assert not leader.may_take(held, "me", observed.see(held, now=114.9), holding=False)
    assert leader.may_take(held, "me", observed.see(held, now=115.0), holding=False)
    assert leader.may_take(held, "me", 0.0, holding=True)
