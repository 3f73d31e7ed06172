"""`lorakube-dev`: the development tools' command line (never shipped in an image)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakube-dev", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a tiny 2-node LoRA on a local cluster, end to end")
    demo.add_argument("--keep", action="store_true", help="leave the cluster (and the job) up afterwards")
    demo.add_argument("--state-dir", default=None,
                      help="where the demo keeps its cluster and files (default ~/.cache/lorakube/demo)")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the job")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lorakube_dev import demo

    return demo.run(state_dir=args.state_dir, keep=args.keep, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
