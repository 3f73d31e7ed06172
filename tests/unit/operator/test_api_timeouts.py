"""Every API call of the operator is bounded in time, against a real socket that accepts the
connection and never answers (what a half-dead apiserver or a black-holed connection looks like).

Before the fix the kubernetes client waited forever: a pass stuck in such a call held the job's
reconciles (one pass per job at a time) until the operator restarted.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from lorakube import builders, handlers, kube, leader

BOUND = (0.5, 1.0)  # (connect, read) seconds for these tests; production: kube.REQUEST_TIMEOUT
SLACK = 2.0          # scheduling on a loaded test machine


class SilentServer:
    """Accepts TCP connections on loopback and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)  # held open, never answered

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "silent",
        "clusters": [{"name": "silent", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "silent", "context": {"cluster": "silent", "user": "u"}}],
    }))
    return path


@pytest.fixture
def bounded(monkeypatch) -> None:
    # The default every client gets, as the operator loads it (no per-call timeout anywhere).
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", BOUND)


@pytest.mark.parametrize("scheme", ["http", "https"])  # https: the TLS handshake is never answered
def test_a_call_to_a_server_that_never_answers_fails_within_the_bound(tmp_path, monkeypatch, silent, bounded,
                                                                       scheme):
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"{scheme}://127.0.0.1:{silent.port}")))
    client = kube.Kube(kube.load_api_client())
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        client.get_job("ns", "job")
    elapsed = time.monotonic() - started
    assert not isinstance(raised.value, ApiException)
    assert "timed out" in str(raised.value).lower() or "timeout" in type(raised.value).__name__.lower()
    assert elapsed < sum(BOUND) + SLACK
    assert silent.connections, "the call never reached the server"


def test_a_pass_that_times_out_is_retried(tmp_path, monkeypatch, silent, bounded):
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{silent.port}")))
    monkeypatch.setattr(handlers, "ERROR_RETRY_SECONDS", 0.2)
    reconciler = handlers.Reconciler(kube.Kube(kube.load_api_client()), builders.OperatorConfig())

    async def scenario() -> None:
        # Before the fix the first pass never returned.
        await asyncio.wait_for(reconciler.trigger(("ns", "job"), {}), sum(BOUND) + SLACK)
        assert ("ns", "job") in reconciler._requeues, "a failed pass must book another look"
        deadline = time.monotonic() + sum(BOUND) + SLACK
        while len(silent.connections) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(silent.connections) >= 2, "the requeued pass did not call the API again"
        for handle in reconciler._requeues.values():
            handle.cancel()

    asyncio.run(scenario())


def test_a_replica_whose_lease_lapsed_sends_no_write(tmp_path, monkeypatch, silent, bounded):
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{silent.port}")))
    leadership = leader.Leadership()  # never renewed: lapsed
    client = kube.Kube(kube.load_api_client(fence=leadership.check))
    with pytest.raises(leader.NotLeader):
        client.patch_job_status("ns", "job", {"phase": "Failed"})
    with pytest.raises(leader.NotLeader):
        client.delete_pod("ns", "job-node-0")
    assert not silent.connections, "a write left the process after the lease lapsed"
    with pytest.raises(Exception) as raised:  # reads are not fenced (they change nothing)
        client.get_job("ns", "job")
    assert not isinstance(raised.value, leader.NotLeader)


def test_kopfs_own_requests_and_watches_are_bounded_and_pods_are_selected_by_the_server(tmp_path, monkeypatch,
                                                                                          silent):
    import kopf
    from kopf._cogs.structs import references

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{silent.port}")))
    settings = kopf.OperatorSettings()
    handlers.configure(settings=settings, memo=kopf.Memo())
    assert settings.networking.request_timeout is not None and settings.networking.request_timeout <= 60
    assert settings.networking.connect_timeout is not None and settings.watching.connect_timeout is not None
    assert settings.watching.client_timeout is not None and settings.watching.inactivity_timeout
    pods = references.Resource(group="", version="v1", plural="pods", kind="Pod", namespaced=True)
    assert settings.watching.label_selectors.collect(pods) == ["app.kubernetes.io/managed-by=lorakube"]
    metrics_pods = references.Resource(group="metrics.k8s.io", version="v1beta1", plural="pods")
    assert settings.watching.label_selectors.collect(metrics_pods) == []


def test_a_leader_whose_renewals_hang_gives_up_at_its_renew_deadline(tmp_path, monkeypatch, silent):
    # Before the fix a renewal without a timeout hung for good (and a non-API error ended the
    # renewal thread silently): the leader went on acting without a lease.
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{silent.port}")))
    times = leader.LeaseTimes(duration_seconds=1.0, renew_deadline_seconds=0.6, retry_seconds=0.1)
    elector = leader.LeaderElector(kube.load_api_client(), "ns", "me", times)
    elector.leadership.extend(time.monotonic() + times.renew_deadline_seconds)
    stop, lost = threading.Event(), threading.Event()
    renewer = threading.Thread(target=elector.keep_renewing, args=(stop, lost), daemon=True)
    renewer.start()
    assert lost.wait(times.renew_deadline_seconds * 2 + SLACK), "the leader kept its leadership without renewing"
    assert not elector.leadership.valid()
    stop.set()
    renewer.join(timeout=5)
    assert silent.connections


def test_the_deadline_watchdog_does_not_wait_for_a_stuck_renewal():
    elector = leader.LeaderElector(None, "ns", "me", leader.LeaseTimes())  # no API call is made
    elector.leadership.extend(time.monotonic() + 0.3)
    stop, lost = threading.Event(), threading.Event()
    watchdog = threading.Thread(target=elector.watch_deadline, args=(stop, lost), daemon=True)
    watchdog.start()
    started = time.monotonic()
    assert lost.wait(5)
    assert 0.2 < time.monotonic() - started < 0.3 + SLACK
    stop.set()
    watchdog.join(timeout=5)
