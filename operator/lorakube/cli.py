"""`lorakube`: run the LoRATrainingJob operator (what the operator image runs).

The one-machine demo is a development tool: `lorakube-dev demo` (package `lorakube_dev`)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence

from lorakube.leader import LeaseTimes

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
    op.add_argument("--liveness", metavar="URL", default=None,
                    help="serve Kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
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


def run_operator(namespaces: Sequence[str] = (), leader_elect: bool = False, liveness: str | None = None,
                 verbose: bool = False, lease_times: LeaseTimes | None = None) -> int:
    """Run the operator until SIGTERM/SIGINT (or, with leader election, until the lease is lost).
    Returns the exit code."""
    import kopf

    import lorakube
    from lorakube import handlers  # noqa: F401 - registers the handlers
    from lorakube import kube, leader

    kopf.configure(verbose=verbose)
    if not verbose:
        # Kopf logs every handler call at INFO; the operator's own transitions are what matter.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    # The replica's name in the apiserver's logs; the field manager stays `lorakube-operator`.
    user_agent = f"lorakube-operator/{lorakube.__version__} ({identity})"
    leadership = leader.Leadership.always()
    stop, lost = threading.Event(), threading.Event()
    if leader_elect:
        namespace = os.environ.get("LORAKUBE_OPERATOR_NAMESPACE") or _own_namespace()
        if not namespace:
            log.error("--leader-elect needs $LORAKUBE_OPERATOR_NAMESPACE (the Lease's namespace)")
            return 2
        elector = leader.LeaderElector(kube.load_api_client(user_agent=user_agent), namespace, identity,
                                       lease_times or LeaseTimes())
        leadership = elector.leadership
        if not elector.wait_until_leader(stop):
            return 0
        threading.Thread(target=elector.keep_renewing, args=(stop, lost), daemon=True).start()
        threading.Thread(target=elector.watch_deadline, args=(stop, lost), daemon=True).start()
        threading.Thread(target=_exit_when_lost, args=(lost,), daemon=True).start()
    memo = kopf.Memo(leadership=leadership, user_agent=user_agent)
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=list(namespaces), liveness_endpoint=liveness,
             memo=memo)
    stop.set()  # ends the lease renewal
    if leader_elect and not lost.is_set():
        elector.release()
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "wait-job":
        from lorakube import waitjob

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        namespace = args.namespace or _own_namespace() or "default"
        return waitjob.wait(waitjob.reader(), namespace, args.name, args.timeout, args.interval)
    return run_operator(args.namespace, args.leader_elect, args.liveness, args.verbose,
                        _lease_times(parser, args))


if __name__ == "__main__":
    sys.exit(main())
