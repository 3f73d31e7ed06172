"""`lorakube-train`: parse flags, run, and turn failures into the contract's exit codes.

0 success; EXIT_INVALID_ARGS bad flags/config; EXIT_DATASET_ERROR malformed dataset;
EXIT_RETRYABLE rendezvous/collective timeouts and vanished peers (the operator restarts the gang);
EXIT_USER_ERROR anything else (with the traceback in the log); 143 on SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Sequence

from lorakube import contract

from .config import ConfigError, parse_config

log = logging.getLogger("lorakube_trainer")


def _fail(code: int, message: str) -> int:
    print(f"{contract.TRAINER_COMMAND}: error: {message}", file=sys.stderr, flush=True)
    return code


def run_cli(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        return _fail(contract.EXIT_INVALID_ARGS, str(exc))

    # Heavy imports (torch, lightning, diffusers) only after the flags are known to be good.
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .distributed import RendezvousTimeout, is_retryable
    from .train import run

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        run(cfg)
    except SIGTERMException:
        # Lightning turns SIGTERM into a SystemExit without a code (= 0, "success"): report the
        # signal as the shell would, so the operator classifies it as a retryable kill.
        return _fail(128 + signal.SIGTERM, "terminated by SIGTERM (pod deleted, evicted or preempted)")
    except ConfigError as exc:
        return _fail(contract.EXIT_INVALID_ARGS, str(exc))
    except DatasetError as exc:
        return _fail(contract.EXIT_DATASET_ERROR, f"dataset: {exc}")
    except CheckpointError as exc:
        return _fail(contract.EXIT_USER_ERROR, str(exc))
    except RendezvousTimeout as exc:
        return _fail(contract.EXIT_RETRYABLE, f"rendezvous: {exc}")
    except Exception as exc:  # noqa: BLE001 - every failure must map to an exit code the operator understands
        if is_retryable(exc):
            log.exception("retryable infrastructure failure")
            return _fail(contract.EXIT_RETRYABLE, f"distributed: {exc}")
        log.exception("training failed")
        return _fail(contract.EXIT_USER_ERROR, f"{type(exc).__name__}: {exc}")
    return contract.EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_cli(argv))


if __name__ == "__main__":
    main()
