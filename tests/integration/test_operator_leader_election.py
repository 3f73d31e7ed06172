"""Two operator replicas on the real API server: only one holds the Lease at a time."""

from __future__ import annotations

import threading
import time

import pytest

from lorakube import kube, leader

pytestmark = pytest.mark.cluster


def test_only_one_replica_leads_and_a_follower_takes_over_an_expired_lease(local_cluster, new_namespace,
                                                                            monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(local_cluster.kubeconfig))
    times = leader.LeaseTimes(duration_seconds=2, renew_seconds=0.5, retry_seconds=0.2)
    first = leader.LeaderElector(kube.load_api_client(), new_namespace, "replica-a", times)
    second = leader.LeaderElector(kube.load_api_client(), new_namespace, "replica-b", times)

    assert first.try_claim()
    assert not second.try_claim()
    assert first.try_claim()  # renewing its own lease

    stop, lost = threading.Event(), threading.Event()
    renewer = threading.Thread(target=first.keep_renewing, args=(stop, lost), daemon=True)
    renewer.start()
    time.sleep(times.duration_seconds + 1)
    assert not second.try_claim(), "the lease expired although its holder kept renewing it"

    stop.set()
    renewer.join(timeout=5)
    started = time.monotonic()
    assert second.wait_until_leader(threading.Event())
    assert time.monotonic() - started < times.duration_seconds + 2
    lease = local_cluster.get_json("lease", leader.LEASE_NAME, namespace=new_namespace)
    assert lease["spec"]["holderIdentity"] == "replica-b"
    assert lease["spec"]["leaseTransitions"] == 1
    assert not lost.is_set()

    # a clean exit hands the lease over at once
    second.release()
    assert first.try_claim()
