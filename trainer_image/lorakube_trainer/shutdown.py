"""What a trainer process does on SIGTERM (preemption, eviction, drain, spot notice, gang restart).

During training (between the first and the last optimizer step, with checkpoints enabled) a
SIGTERM only *asks* for a stop: the handler records the request and returns, the rank finishes
the optimizer step it is in, and after every step all ranks combine their requests in one small
all-reduce (`agree_to_stop`, MAX of a 0/1 flag). Ranks get the signal at different moments, or only
one pod is signalled, yet every rank sees the same result after the same step; then every rank
takes part in a checkpoint at that step (written into a temporary folder, published by rename after
the COMPLETE marker, as every checkpoint is) and raises `GracefulStop`, which the CLI turns into
EXIT_RETRYABLE (75). The operator restarts the gang, and the next attempt resumes at that step + 1:
no step is lost.

The signal handler itself never runs a collective and never waits (Lightning's does, and a rank
interrupted inside another collective then waits for a peer that waits for something else): a
request only sets a flag. Two things end the process at once with 143, as before this existed:
- a deadline, measured from the first SIGTERM: the pod's grace period (ENV_TERMINATION_GRACE, which
  the operator sets from spec.runPolicy.terminationGracePeriodSeconds; Kubernetes' 30 s when unset)
  minus DEADLINE_MARGIN_SECONDS. A daemon thread enforces it, so a rank stuck in a collective with a
  peer that is gone (it cannot run Python signal handlers) still leaves before the kubelet's SIGKILL;
- a second SIGTERM at least REPEAT_AFTER_SECONDS after the first (an impatient operator; copies of
  one signal sent to a process group and forwarded by the launcher arrive within milliseconds).
Outside training (model load, rendezvous, artifacts, or with checkpoints off) there is no step to
save, so SIGTERM exits at once with 143 as well. Either way nothing half-written is ever resumed
from: the COMPLETE marker is written last, after every file it hashes, inside the temporary folder.

Standard library only: the CLI installs the handler before it imports torch, so a SIGTERM during
the (long) model load ends at once. The all-reduce (`agree_to_stop`) imports torch when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Mapping

from lorakube_api import contract

EXIT_SIGTERM = 128 + signal.SIGTERM
# Left for flushing and exiting (and the kubelet's own delays) between our deadline and its SIGKILL.
DEADLINE_MARGIN_SECONDS = 5.0
# A second SIGTERM sooner than this is a copy of the first (process group + launcher forwarding).
REPEAT_AFTER_SECONDS = 1.0


class GracefulStop(Exception):
    """Raised on every rank after the checkpoint at the step all ranks agreed to stop at."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after SIGTERM at step {step}: checkpoint {contract.checkpoint_dir_name(step)} "
                         f"written; the next attempt resumes at step {step + 1}")
        self.step = step


def grace_seconds(env: Mapping[str, str]) -> float:
    """The pod's grace period as the operator passed it (Kubernetes' default when absent or bad)."""
    raw = env.get(contract.ENV_TERMINATION_GRACE, "")
    try:
        value = float(raw)
    except ValueError:
        return float(contract.KUBERNETES_DEFAULT_GRACE_SECONDS)
    return value if value >= 0 else float(contract.KUBERNETES_DEFAULT_GRACE_SECONDS)


def stop_budget_seconds(env: Mapping[str, str]) -> float:
    """How long after the first SIGTERM a rank may keep working (finish the step, checkpoint)."""
    return grace_seconds(env) - DEADLINE_MARGIN_SECONDS


@dataclasses.dataclass
class _State:
    graceful: bool = False          # inside training with checkpoints on: a SIGTERM asks, not ends
    owner_pid: int = 0              # the process that enabled it (not its forked DataLoader workers)
    requested_at: float | None = None
    budget_s: float = 0.0
    # Set by reset(): the deadline of a request that was dealt with in-process (a test, or an
    # embedding application that trains again) must not fire into the next run.
    deadline_cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


_state = _State()


def _flush_everything() -> None:
    # Best effort: the handler may have interrupted a write on one of these streams, and a
    # re-entrant flush of a buffered stream raises instead of blocking.
    # Nothing may stop the exit.
    for flushable in (*logging.getLogger().handlers, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            flushable.flush()


def _say(text: str) -> None:
    # os.write: unbuffered and lock-free, so it cannot deadlock on a stream the main thread holds.
    with contextlib.suppress(OSError):
        os.write(2, f"lorakube-train: {text} (pid {os.getpid()})\n".encode())


def leave(code: int) -> None:
    """End this process now with `code`, output flushed, no interpreter teardown."""
    _flush_everything()
    os._exit(code)


def _exit_143(why: str) -> None:
    _flush_everything()
    _say(f"{why}: exiting with {EXIT_SIGTERM} now; the newest complete checkpoint stays valid")
    os._exit(EXIT_SIGTERM)


def exit_now(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler: no locks, no collectives, no waiting."""
    if not _state.graceful:
        _exit_143("received SIGTERM")
    if os.getpid() != _state.owner_pid:
        # A helper forked during training (a DataLoader worker) that got the signal with its
        # process group: its death would fail the step the trainer is finishing. It ends with
        # the trainer (PyTorch's workers watch their parent).
        return
    now = time.monotonic()
    if _state.requested_at is not None:
        if now - _state.requested_at >= REPEAT_AFTER_SECONDS:
            _exit_143("received a second SIGTERM")
        return                      # a copy of the first one
    _state.requested_at = now
    if _state.budget_s <= 0:
        _exit_143(f"received SIGTERM with a grace period too short to checkpoint "
                  f"({contract.ENV_TERMINATION_GRACE} minus {DEADLINE_MARGIN_SECONDS:g} s)")
    threading.Thread(target=_enforce_deadline, args=(now + _state.budget_s, _state.deadline_cancelled),
                     name="lorakube-sigterm-deadline", daemon=True).start()
    _say(f"received SIGTERM: finishing the current step, then checkpointing at the step every rank agrees on "
         f"and exiting with {contract.EXIT_RETRYABLE}; exiting with {EXIT_SIGTERM} instead if that takes more "
         f"than {_state.budget_s:g} s")


def _enforce_deadline(at: float, cancelled: threading.Event) -> None:
    if cancelled.wait(max(0.0, at - time.monotonic())):
        return
    _exit_143("the grace period is almost over and the checkpoint after SIGTERM is not done")


def install() -> None:
    """Make `exit_now` the SIGTERM handler (only the main thread may set handlers; a caller on
    another thread, e.g. an embedding application, keeps its own)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_now)


def begin_graceful(env: Mapping[str, str] | None = None) -> None:
    """From now on a SIGTERM asks for a stop at the next step boundary (see the module doc)."""
    env = os.environ if env is None else env
    _state.budget_s = stop_budget_seconds(env)
    _state.owner_pid = os.getpid()
    _state.graceful = True


def end_graceful() -> bool:
    """Back to exiting at once on SIGTERM; True if a stop was asked for meanwhile."""
    _state.graceful = False
    return _state.requested_at is not None


def stop_requested() -> bool:
    return _state.requested_at is not None


def reset() -> None:
    """Forget any request (a process that runs training twice, e.g. a test)."""
    _state.graceful, _state.requested_at = False, None
    _state.deadline_cancelled.set()
    _state.deadline_cancelled = threading.Event()


def agree_to_stop(requested: bool, device: Any = None) -> bool:
    """Collective: True on every rank if any rank asked to stop. Every rank must call it at the
    same point (after each optimizer step); one 4-byte all-reduce, cheap on gloo and NCCL."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return requested
    flag = torch.tensor([1 if requested else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def keep_lightning_off_sigterm(trainer: Any) -> None:
    """Stop `trainer` from replacing the SIGTERM handler when fit() starts.

    Lightning has no switch for its signal connector, so this replaces the connector's register
    method on this one trainer with `install`. If a Lightning release renames the connector, the
    trainer's callback re-installs the handler at on_train_start (a later, smaller window), and the
    SIGTERM tests notice.
    """
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "register_signal_handlers"):
        connector.register_signal_handlers = install
