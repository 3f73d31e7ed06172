"""`lorakube`: run the LoRATrainingJob operator (what the operator image runs).

The one-machine demo is a development tool: `lorakube-dev demo` (package `lorakube_dev`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

from lorakube.leader import LeaseTimes

DEFAULT_HTTP_ADDRESS = "0.0.0.0:8080"
# How often a replica that has not reached the API server yet tries again (its /readyz).
API_CHECK_SECONDS = 2.0

log = logging.getLogger("lorakube")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakube", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    op = commands.add_parser("operator", help="run the LoRATrainingJob operator")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch this namespace (repeat for several; globs as in Kopf)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    op.add_argument("--leader-elect", action="store_true",
                    help="hold a coordination.k8s.io Lease so only one replica acts; the namespace is "
                         "$LORAKUBE_OPERATOR_NAMESPACE (or the pod's own namespace)")
    defaults = LeaseTimes()
    op.add_argument("--lease-duration", type=float, default=defaults.duration_seconds, metavar="SECONDS",
                    help="how long a follower waits, on its own clock, for an unchanged Lease before "
                         "taking it over (default %(default)s)")
    op.add_argument("--renew-deadline", type=float, default=defaults.renew_deadline_seconds, metavar="SECONDS",
                    help="the leader stops acting and exits when it has not renewed for this long; "
                         "must be shorter than --lease-duration (default %(default)s)")
    op.add_argument("--retry-period", type=float, default=defaults.retry_seconds, metavar="SECONDS",
                    help="how often the leader renews and a follower tries (default %(default)s)")
    op.add_argument("--http-address", metavar="HOST:PORT", default=DEFAULT_HTTP_ADDRESS,
                    help="serve /metrics (Prometheus), /healthz (liveness) and /readyz (readiness) here, on "
                         "every replica, leader or not; 'off' (or '') serves nothing (default %(default)s)")
    # Kopf's own liveness endpoint ran only on the acting replica (a follower never starts Kopf,
    # so its probe would fail and it would be restarted forever); /healthz replaced it.
    op.add_argument("--liveness", default=None, help=argparse.SUPPRESS)
    op.add_argument("--verbose", "-v", action="store_true")

    wait = commands.add_parser(
        "wait-job", help="wait for a LoRATrainingJob to finish: exit 0 when it Succeeded, 1 with its failure "
                         "reason when it Failed, 3 when it did not finish in time (what `helm test` runs)")
    wait.add_argument("name", help="the LoRATrainingJob's name")
    wait.add_argument("--namespace", "-n", default=None,
                      help="its namespace (default: the pod's own, else `default`)")
    wait.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                      help="give up after this long (default %(default)s)")
    wait.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help=argparse.SUPPRESS)

    return parser


def _own_namespace() -> str | None:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def run_operator(namespaces: Sequence[str] = (), leader_elect: bool = False, verbose: bool = False,
                 lease_times: LeaseTimes | None = None, http_address: tuple[str, int] | None = None) -> int:
    """Run the operator until SIGTERM/SIGINT (or, with leader election, until the lease is lost).
    Returns the exit code."""
    import kopf

    import lorakube
    from lorakube import handlers  # noqa: F401 - registers the handlers
    from lorakube import health as hl
    from lorakube import httpserver, kube, leader, metrics

    kopf.configure(verbose=verbose)
    if not verbose:
        # Kopf logs every handler call at INFO; the operator's own transitions are what matter.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    times = lease_times or LeaseTimes()
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    # The replica's name in the apiserver's logs; the field manager stays `lorakube-operator`.
    user_agent = f"lorakube-operator/{lorakube.__version__} ({identity})"
    health = hl.Health(hl.stale_limit(times.renew_deadline_seconds, times.retry_seconds))
    # Before leader election: followers answer probes and scrapes too.
    server = None
    if http_address is not None:
        try:
            server = httpserver.HttpServer(*http_address, health, metrics.OPERATOR.registry).start()
        except OSError as exc:
            log.error("--http-address %s:%d: cannot listen there (%s); give a free HOST:PORT, or 'off'",
                      *http_address, exc.strerror or exc)
            return 2
        log.info("serving /metrics, /healthz and /readyz on %s:%d", *server.address)
    leadership = leader.Leadership.always()
    stop, lost = threading.Event(), threading.Event()
    threading.Thread(target=_check_api, args=(health, stop, user_agent), daemon=True).start()
    try:
        if leader_elect:
            namespace = os.environ.get("LORAKUBE_OPERATOR_NAMESPACE") or _own_namespace()
            if not namespace:
                log.error("--leader-elect needs $LORAKUBE_OPERATOR_NAMESPACE (the Lease's namespace)")
                return 2
            elector = leader.LeaderElector(kube.load_api_client(user_agent=user_agent), namespace, identity, times)
            leadership = elector.leadership
            metrics.OPERATOR.track_leadership(leadership.valid)
            health.following()
            if not elector.wait_until_leader(stop, on_round=health.progress):
                return 0
            threading.Thread(target=elector.keep_renewing, args=(stop, lost), daemon=True).start()
            threading.Thread(target=elector.watch_deadline, args=(stop, lost), daemon=True).start()
            threading.Thread(target=_exit_when_lost, args=(lost,), daemon=True).start()
        metrics.OPERATOR.track_leadership(leadership.valid)
        health.leading()
        memo = kopf.Memo(leadership=leadership, user_agent=user_agent, metrics=metrics.OPERATOR)
        _run_kopf(kopf.operator(standalone=True, clusterwide=not namespaces, namespaces=list(namespaces),
                                memo=memo), health)
        stop.set()  # ends the lease renewal
        if leader_elect and not lost.is_set():
            elector.release()
        return 0
    finally:
        health.stopped()
        stop.set()
        if server is not None:
            server.stop()


def _run_kopf(operator: Coroutine[Any, Any, None], health: Any) -> None:
    """As kopf.run, on a loop that also runs the liveness tick (health.tick_forever): the tick
    shows Kopf's loop still runs tasks. The Runner cancels the tick when Kopf returns."""
    from lorakube import health as hl

    with asyncio.Runner() as runner:
        runner.get_loop().create_task(hl.tick_forever(health))
        try:
            runner.run(operator)
        except asyncio.CancelledError:
            pass  # Kopf's own shutdown (SIGTERM) cancels the main task: a normal stop, not an error


def _check_api(health: Any, stop: threading.Event, user_agent: str) -> None:
    """Until it succeeds: can this replica reach the API server, and is the CRD there? (/readyz)"""
    from lorakube import kube

    last = None
    while not stop.is_set():
        try:
            problem = kube.api_problem(kube.load_api_client(user_agent=user_agent))
        except Exception as exc:  # noqa: BLE001 - no kubeconfig, no in-cluster credentials
            problem = f"cannot load the API server's address and credentials: {exc}"
        if problem is None:
            health.api_reached()
            log.info("reached the API server; ready")
            return
        health.api_failed(problem)
        if problem != last:
            log.warning("not ready: %s", problem)
            last = problem
        stop.wait(API_CHECK_SECONDS)


def _exit_when_lost(lost: threading.Event) -> None:
    """A replica that lost the lease exits at once, without Kopf's graceful shutdown: nothing of
    it may write any more (Kopf's own bookkeeping included), and its pod restarts as a follower."""
    lost.wait()
    log.error("lost the leader lease; exiting at once so a restarted replica rejoins as a follower")
    logging.shutdown()
    os._exit(1)


def _lease_times(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LeaseTimes:
    try:
        return LeaseTimes(args.lease_duration, args.renew_deadline, args.retry_period)
    except ValueError as exc:
        parser.error(f"--retry-period, --renew-deadline, --lease-duration: {exc}")


def _http_address(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, int] | None:
    from lorakube import httpserver

    if args.liveness is not None:
        parser.error("--liveness was removed: /healthz on --http-address (default "
                     f"{DEFAULT_HTTP_ADDRESS}) is the liveness probe now, on every replica")
    try:
        return httpserver.parse_address(args.http_address)
    except httpserver.AddressError as exc:
        parser.error(f"--http-address: {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "wait-job":
        from lorakube import waitjob

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        namespace = args.namespace or _own_namespace() or "default"
        return waitjob.wait(waitjob.reader(), namespace, args.name, args.timeout, args.interval)
    return run_operator(args.namespace, args.leader_elect, args.verbose, _lease_times(parser, args),
                        _http_address(parser, args))


if __name__ == "__main__":
    sys.exit(main())
