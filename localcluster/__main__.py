"""`python -m localcluster up|down|status|build|kubeconfig [--state-dir D]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from localcluster.build import BuildError, build
from localcluster.versions import TARGET_SETS
from localcluster.cluster import ClusterError, LocalCluster, default_nodes, default_state_dir
from localcluster.controlplane import StartupError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m localcluster",
        description="A real Kubernetes control plane and a process node on this machine.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build_command = sub.add_parser("build", help="build etcd, kube-*, kubectl and helm (cached)")
    build_command.add_argument(
        "set", nargs="?", choices=sorted([*TARGET_SETS, "azurite"]), default="core",
        help="core: the control plane, kubectl and helm (default); kueue: Kueue's manager; "
             "s3: the S3 server (versitygw) of the object-storage tests; gcs: the Google Cloud Storage "
             "emulator (fake-gcs-server); azurite: the Azure Blob Storage emulator (npm ci); "
             "training-operator: Kubeflow's PyTorchJob controller, the operator benchmark's peer")
    for name, text in (
        ("up", "start the cluster in the background"),
        ("down", "stop everything and check nothing is left"),
        ("status", "say what runs"),
        ("kubeconfig", "print the admin kubeconfig path"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument(
            "--state-dir", type=Path, default=default_state_dir(),
            help="where the cluster keeps its state (default: %(default)s)",
        )
        if name == "up":
            command.add_argument("--nodes", type=int, default=1,
                                 help="process nodes to register; 0 = control plane only")
            command.add_argument("--gpus-per-node", type=int, default=0,
                                 help="nvidia.com/gpu each node advertises")
    return parser


def _up(args: argparse.Namespace) -> int:
    if args.nodes < 0 or args.gpus_per_node < 0:
        print("--nodes and --gpus-per-node must be 0 or more", file=sys.stderr)
        return 2
    nodes = default_nodes(args.nodes, args.gpus_per_node) if args.nodes else []
    cluster = LocalCluster(args.state_dir, nodes=nodes).up()
    print(f"kubeconfig: {cluster.kubeconfig}")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


def _down(args: argparse.Namespace) -> int:
    started = time.monotonic()
    problems = LocalCluster(args.state_dir).down()
    if problems:
        print("down finished, but these are still there:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    print(f"down in {time.monotonic() - started:.1f} s; no processes, ports or mounts left")
    return 0


def _status(args: argparse.Namespace) -> int:
    status = LocalCluster(args.state_dir).status()
    print(status.describe())
    return 0 if status.up else 3


def _kubeconfig(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.state_dir)
    if not cluster.status().up:
        print(f"no running cluster in {args.state_dir}: run `python -m localcluster up`",
              file=sys.stderr)
        return 3
    print(cluster.kubeconfig)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"up": _up, "down": _down, "status": _status, "kubeconfig": _kubeconfig}
    try:
        if args.command == "build" and args.set == "azurite":
            from localcluster.azurite import install

            install()
            return 0
        if args.command == "build":
            build(build_targets=TARGET_SETS[args.set]())
            return 0
        return handlers[args.command](args)
    except (BuildError, ClusterError, StartupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
