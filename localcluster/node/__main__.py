"""`python -m localcluster.node run|stop|logs` (run is what start_node_daemon spawns)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .nodespec import NodeSpec


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env {text!r}: expected KEY=VALUE")
    return key, value


def _node(text: str) -> NodeSpec:
    try:
        return NodeSpec.from_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m localcluster.node")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the node daemon in the foreground (needs root)")
    run.add_argument("--kubeconfig", type=Path, required=True)
    run.add_argument("--state-dir", type=Path, required=True)
    run.add_argument("--node", type=_node, action="append", required=True,
                     metavar="NAME[:GPUS[:CPU[:MEMORY[:PODS]]]]")
    run.add_argument("--path-prefix", type=Path, action="append", default=[],
                     help="directory put first on every container's PATH (repeatable)")
    run.add_argument("--env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                     help="environment every container gets, like an image's ENV (repeatable)")
    run.add_argument("--kubelet-port", type=int, default=10250,
                     help="port of the kubelet API (logs); 0 picks a free one")
    run.add_argument("--restart-backoff-base", type=float, default=10.0, metavar="SECONDS",
                     help="first wait before restarting a crashing container (kubelet: 10)")
    run.add_argument("--restart-backoff-max", type=float, default=300.0, metavar="SECONDS",
                     help="cap of the doubling restart back-off (kubelet: 300); a container "
                          "that ran twice this long starts over at the base")
    run.add_argument("--kubelet-client-ca", type=Path,
                     help="CA that kubelet API clients' certificates must chain to "
                          "(default: the kubeconfig's CA)")
    stop = sub.add_parser("stop", help="stop a running daemon and clean up after it")
    stop.add_argument("--state-dir", type=Path, required=True)
    logs = sub.add_parser("logs", help="print a container's log (works without kubectl)")
    logs.add_argument("namespace")
    logs.add_argument("pod")
    logs.add_argument("-c", "--container", help="container name (default: the only/first one)")
    logs.add_argument("--state-dir", type=Path,
                      help="the daemon's state dir (default: the running daemon's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "logs":
        from .logs import print_logs

        return print_logs(args.namespace, args.pod, args.container, args.state_dir)
    if args.command == "stop":
        from . import stop_node_daemon

        stop_node_daemon(args.state_dir)
        return 0
    if os.geteuid() != 0:
        print("error: the process node needs root: it creates network namespaces, a bridge and "
              "bind mounts for every pod (see localcluster/node/README.md, 'Without root')",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import hostregistry
    from .cleanup import sweep
    from .daemon import DaemonConfig, NodeDaemon
    from .restarts import BackOff

    try:
        backoff = BackOff(args.restart_backoff_base, args.restart_backoff_max)
    except ValueError as exc:
        print(f"error: --restart-backoff-base/--restart-backoff-max: {exc}", file=sys.stderr)
        return 2

    state_dir = args.state_dir.resolve()
    config = DaemonConfig(kubeconfig=args.kubeconfig, state_dir=state_dir, nodes=args.node,
                          path_prefix=args.path_prefix, image_env=dict(args.env),
                          kubelet_port=args.kubelet_port, kubelet_client_ca=args.kubelet_client_ca,
                          restart_backoff=backoff)
    daemon = NodeDaemon(config)
    try:
        registration = hostregistry.register_daemon(
            state_dir, (daemon.api.endpoint.host, daemon.api.endpoint.port))
    except hostregistry.NodeBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        sweep(state_dir)  # what a crashed predecessor with this state dir left behind
        daemon.run()
    finally:
        registration.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
