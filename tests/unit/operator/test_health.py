"""The operator's /healthz and /readyz: the answers for each role, and the real HTTP server."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge

from lorakube import cli, health, httpserver
from lorakube.health import Health


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_follower_is_alive_while_its_lease_loop_goes_round(clock):
    state = Health(stale_after=30, clock=clock)
    state.following()
    for _ in range(20):   # 20 rounds of 2 s: 40 s, each round counts
        clock.now += 2
        state.progress()
    verdict = state.liveness()
    assert verdict.ok and verdict.http_status == 200
    assert "follower" in verdict.reason and "lease" in verdict.reason


def test_a_follower_whose_lease_loop_stopped_going_round_is_not_alive(clock):
    state = Health(stale_after=30, clock=clock)
    state.following()
    state.progress()
    clock.now += 31
    verdict = state.liveness()
    assert not verdict.ok and verdict.http_status == 503
    assert "the lease loop" in verdict.reason and "31 s" in verdict.reason


def test_the_leader_is_alive_while_kopfs_loop_ticks_and_not_once_it_stalls(clock):
    state = Health(stale_after=30, clock=clock)
    state.following()
    clock.now += 100          # a long wait for the lease means nothing once leading
    state.leading()
    assert state.liveness().ok, "Kopf's loop gets its own allowance from the moment the replica leads"
    clock.now += 29
    state.progress()
    clock.now += 29
    assert state.liveness().ok
    clock.now += 2
    verdict = state.liveness()
    assert not verdict.ok
    assert "Kopf's event loop" in verdict.reason


def test_a_stopped_replica_is_neither_alive_nor_ready(clock):
    state = Health(clock=clock)
    state.api_reached()
    state.leading()
    state.stopped()
    assert not state.liveness().ok
    assert not state.readiness().ok
    assert "stopped" in state.readiness().reason


def test_readiness_waits_for_the_api_server_and_says_what_is_wrong(clock):
    state = Health(clock=clock)
    state.following()
    assert not state.readiness().ok
    state.api_failed("the API server does not serve lorakube.io/v1alpha1: install the CRD")
    verdict = state.readiness()
    assert not verdict.ok and "install the CRD" in verdict.reason
    state.api_reached()
    assert state.readiness().ok, "a follower that reached the API server is ready (a healthy standby)"
    state.api_failed("a later failure")
    assert state.readiness().ok, "readiness, once reached, stays"
    state.leading()
    assert state.readiness().ok


def test_the_stale_limit_covers_two_whole_lease_rounds():
    assert health.stale_limit(10, 2) == 44            # two rounds of (read + write at 10 s) + 2 s
    assert health.stale_limit(3, 0.5) == health.MIN_STALE_SECONDS


def test_the_kopf_tick_records_progress_from_inside_an_event_loop(clock):
    state = Health(stale_after=30, clock=clock)
    state.leading()
    clock.now += 40
    assert not state.liveness().ok

    async def tick_once() -> None:
        task = asyncio.create_task(health.tick_forever(state, interval=0.01))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(tick_once())
    assert state.liveness().ok


@pytest.mark.parametrize("text, parsed", [
    ("0.0.0.0:8080", ("0.0.0.0", 8080)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    (":9090", ("0.0.0.0", 9090)),
    ("[::]:8080", ("::", 8080)),
    ("off", None),
    ("", None),
])
def test_http_addresses_parse(text, parsed):
    assert httpserver.parse_address(text) == parsed


@pytest.mark.parametrize("text, words", [
    ("8080", "is not HOST:PORT"),
    ("localhost:http", "is not HOST:PORT"),
    ("0.0.0.0:70000", "is not HOST:PORT"),
    ("::1:8080", "in brackets"),
    ("[nope]:8080", "not an IPv6 address"),
])
def test_bad_http_addresses_are_refused_with_the_fix(text, words):
    with pytest.raises(httpserver.AddressError, match=words):
        httpserver.parse_address(text)


def test_the_cli_names_the_flag_of_a_bad_address_and_the_replacement_of_liveness(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["operator", "--http-address", "8080"])
    assert exited.value.code == 2
    assert "--http-address: '8080' is not HOST:PORT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["operator", "--liveness", "http://0.0.0.0:8080/healthz"])
    assert "--liveness was removed: /healthz on --http-address" in capsys.readouterr().err


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_the_http_server_serves_metrics_health_and_readiness(clock):
    registry = CollectorRegistry()
    Gauge("lorakube_example", "an example", registry=registry).set(3)
    state = Health(stale_after=30, clock=clock)
    state.following()
    server = httpserver.HttpServer("127.0.0.1", 0, state, registry).start()
    try:
        base = "http://%s:%d" % server.address
        assert server.address[1] > 0
        status, content_type, body = _get(base + "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert "lorakube_example 3.0" in body
        assert _get(base + "/healthz")[0] == 200
        status, _, body = _get(base + "/readyz")
        assert status == 503 and "has not reached the API server" in body
        state.api_reached()
        assert _get(base + "/readyz")[0] == 200
        clock.now += 60
        status, _, body = _get(base + "/healthz")
        assert status == 503 and "no progress for 60 s" in body
        assert _get(base + "/nothing")[0] == 404
    finally:
        server.stop()


def test_a_taken_port_fails_at_startup(clock):
    first = httpserver.HttpServer("127.0.0.1", 0, Health(clock=clock), CollectorRegistry()).start()
    try:
        with pytest.raises(OSError):
            httpserver.HttpServer("127.0.0.1", first.address[1], Health(clock=clock), CollectorRegistry())
    finally:
        first.stop()
