"""`lorakube-train`: parse flags, run, and turn failures into the contract's exit codes.

0 success; EXIT_INVALID_ARGS bad flags/config; EXIT_OUT_OF_MEMORY CUDA out of memory (with a hint);
EXIT_DATASET_ERROR malformed dataset; EXIT_PREFLIGHT_* a failed preflight check (preflight.py),
before torch loads; EXIT_RETRYABLE rendezvous/collective timeouts and vanished
peers (the operator restarts the gang), and after a SIGTERM during training once every rank
checkpointed the step they agreed to stop at; EXIT_USER_ERROR anything else (with the traceback in
the log); 143 on a SIGTERM outside training or past the grace period's deadline (shutdown.py).
With several processes per pod this process is the launcher of the local ranks and exits with the
root cause's code (launcher.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Mapping, MutableMapping, Sequence

from lorakube_api import contract

from . import metrics_server, shutdown
from .config import ConfigError, TrainConfig, parse_config, preflight_only
from .storage import StorageError

if TYPE_CHECKING:
    from .distributed import Topology

log = logging.getLogger("lorakube_trainer")

_FLAG = contract.TRAINING_FLAGS
OOM_HINT = (f"the same settings run out again: lower {_FLAG['batchSize']} (spec.training.batchSize), add "
            f"{_FLAG['gradientCheckpointing']} (spec.training.gradientCheckpointing: true), or use a higher "
            f"DeepSpeed ZeRO stage, {_FLAG['strategy']} deepspeed_stage_2 or deepspeed_stage_3 "
            f"(spec.training.strategy)")


def _fail(code: int, message: str) -> int:
    from .launcher import report_failure

    print(f"{contract.TRAINER_COMMAND}: error: {message}", file=sys.stderr, flush=True)
    report_failure(code, message)
    return code


def _out_of_memory(exc: BaseException) -> BaseException | None:
    """The CUDA OOM behind `exc`, also when a library re-raised it as something else."""
    import torch

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, torch.OutOfMemoryError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _preflight(cfg: TrainConfig, topology: Topology, env: Mapping[str, str]) -> int | None:
    """The pod's first stage (preflight.py): None when every check passed, else the exit code. The
    one line goes to stdout and, as the last line of the log, to the termination message."""
    from . import preflight

    if preflight.skip_in(env):
        return None
    try:
        preflight.run(cfg, topology)
    except preflight.PreflightFailed as exc:
        print(str(exc), flush=True)
        return _fail(exc.code, str(exc))
    return None


def _stage_inputs(cfg: TrainConfig, topology: Topology, env: MutableMapping[str, str]) -> int | None:
    """The pod's second stage, still before torch loads: remote inputs into the node's cache, with
    node 0 reporting the bytes, so the job's Staging phase is the download and not the imports, and
    the local ranks started next find the inputs there. A process some other launcher started
    (torchrun's workers) stages and reports in train.run instead."""
    from . import remote

    if "LOCAL_RANK" in env:
        return None
    try:
        folders = remote.stage_inputs(cfg, env, report=topology.node_rank == 0)
    except StorageError as exc:
        return _fail(contract.EXIT_USER_ERROR, f"storage: {exc}")
    if "dataset_path" in folders:
        # A staged dataset is checked here, once for the pod (and marked checked in its cache
        # entry for every later process: dataset_checked.py), before any local rank starts.
        from .dataset_checked import load_records_once
        from .dataset_layout import DatasetError

        try:
            load_records_once(folders["dataset_path"], cfg.max_image_pixels, dataset_format=cfg.dataset_format,
                              default_caption=cfg.default_caption, caption_extension=cfg.caption_extension)
        except DatasetError as exc:
            return _fail(contract.EXIT_DATASET_ERROR, f"{contract.DATASET_ERROR_PREFIX}: {exc}")
    env[remote.ENV_INPUTS_STAGED] = str(os.getpid())
    return None


def run_cli(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv)
        metrics_server.port_from_env(os.environ)
    except ConfigError as exc:
        return _fail(contract.EXIT_INVALID_ARGS, str(exc))
    shutdown.install()

    from . import launcher, preflight
    from .distributed import plan_topology

    try:
        topology = plan_topology(cfg, os.environ)
    except ConfigError as exc:
        return _fail(contract.EXIT_INVALID_ARGS, str(exc))
    # Before the heavy imports and before launching local ranks: an unwritable output or a missing
    # model fails in a second, not after the model loads.
    failed = _preflight(cfg, topology, os.environ)
    if failed is not None:
        return failed
    if preflight_only(argv):
        print("preflight: every check passed", flush=True)
        return contract.EXIT_OK
    env = dict(os.environ)
    if not preflight.skip_in(env):
        env.update(preflight.dataset_checked_env(cfg))     # every image was read once, above
    failed = _stage_inputs(cfg, topology, env)
    if failed is not None:
        return failed
    if launcher.should_launch(topology, env):
        # Decided without torch: the launcher loads nothing heavy, its local ranks start at once.
        return launcher.launch(topology, env)
    return _train(cfg, env)


def _train(cfg: TrainConfig, env: Mapping[str, str] | None = None) -> int:
    # Heavy imports (torch, lightning, diffusers) only after the flags are known to be good.
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .distributed import RendezvousTimeout, is_retryable
    from .train import run

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        run(cfg, env)
    except shutdown.GracefulStop as exc:
        # Everything worth keeping is in the checkpoint; skip the interpreter's teardown (the
        # process group's destructors took seconds there, out of the pod's grace period).
        shutdown.leave(_fail(contract.EXIT_RETRYABLE, str(exc)))
    except SIGTERMException:
        # Only if Lightning's own handler ran after all (shutdown.py keeps it off): report the signal
        # as the shell would, so the operator classifies it as a retryable kill.
        return _fail(128 + signal.SIGTERM, "terminated by SIGTERM (pod deleted, evicted or preempted)")
    except ConfigError as exc:
        return _fail(contract.EXIT_INVALID_ARGS, str(exc))
    except DatasetError as exc:
        return _fail(contract.EXIT_DATASET_ERROR, f"{contract.DATASET_ERROR_PREFIX}: {exc}")
    except CheckpointError as exc:
        return _fail(contract.EXIT_USER_ERROR, str(exc))
    except StorageError as exc:
        # Transient errors were already retried with backoff (storage.retrying): what is left is
        # a refused permission, a missing bucket/object or an endpoint down for minutes.
        return _fail(contract.EXIT_USER_ERROR, f"storage: {exc}")
    except RendezvousTimeout as exc:
        return _fail(contract.EXIT_RETRYABLE, f"rendezvous: {exc}")
    except Exception as exc:  # noqa: BLE001 - every failure must map to an exit code the operator understands
        oom = _out_of_memory(exc)
        if oom is not None:
            log.exception("CUDA out of memory")
            first_line = (str(oom).strip().splitlines() or ["CUDA out of memory"])[0]
            return _fail(contract.EXIT_OUT_OF_MEMORY, f"CUDA out of memory ({first_line}); {OOM_HINT}")
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
