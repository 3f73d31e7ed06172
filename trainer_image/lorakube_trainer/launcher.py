"""Several training processes in one pod (gpusPerNode > 1): `lorakube-train` starts one child per
local rank itself, and the pod's exit code is the root cause's, whichever rank failed.

Why not Lightning's launcher: it runs local rank 0 in the main process, starts the others as
children, and SIGKILLs the main process when a child exits non-zero, so the pod exits 137 and a user
error on local rank 3 (a corrupt image, a CUDA OOM) is retried as "killed by a signal". Here the
main process only supervises: each child gets LOCAL_RANK (with it set, Lightning's
LightningEnvironment treats the processes as externally launched and starts nothing), NODE_RANK,
WORLD_SIZE and one MASTER_ADDR/MASTER_PORT; a failing child writes its exit code and message to a
file in a per-pod scratch folder; after the first non-zero exit the launcher gives the others a few
seconds to end by themselves (a rank failing at the same moment is still reporting), then stops
them (SIGTERM, a second SIGTERM, which a trainer takes as "now", then SIGKILL after a grace period)
and exits with the root cause's code. The code of a rank the launcher stopped does not count unless
that rank had reported a failure of its own; among the others a user error (1-127 but
EXIT_RETRYABLE) beats a death by signal, which beats a retryable failure (often just a peer noticing
the first failure), then the first to end wins. The last log line names the rank and the reason,
so the pod's log tail (status.lastFailure.logTail) says it, and /dev/termination-log gets it where
Kubernetes mounted one.

A SIGTERM to the pod (the launcher) is forwarded to every local rank, which then stop at the step
the whole gang agrees on and checkpoint it (shutdown.py); the launcher waits for them until the grace
period's deadline and exits EXIT_RETRYABLE when every rank stopped that way (0 if they had all
finished anyway), 143 otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Mapping, Sequence

from lorakube_api import contract

from . import shutdown
from .distributed import Topology
from .files import atomic_write_text

# Set by the launcher for each child: where the child writes {"code", "message"} when it fails.
ENV_FAILURE_FILE = "LORAKUBE_RANK_FAILURE_FILE"
# Kubernetes' default terminationMessagePath; written only where the runtime mounted it.
TERMINATION_LOG = Path("/dev/termination-log")
# After the first failure: how long the other ranks may take to end (and report) by themselves,
# then how long a stopped rank has between SIGTERM and SIGKILL.
SETTLE_SECONDS = 3.0
STOP_GRACE_SECONDS = 10.0
# A stopped rank's peer has failed, so it cannot checkpoint: the second SIGTERM ends it at once.
HURRY_AFTER_SECONDS = shutdown.REPEAT_AFTER_SECONDS + 0.5
POLL_SECONDS = 0.05
MAX_MESSAGE_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class RankExit:
    local_rank: int
    global_rank: int
    code: int                   # the shell's convention: 128 + N for a death by signal N
    stopped_by_launcher: bool
    message: str | None = None  # what the child reported, if it reported anything


def should_launch(topology: Topology, env: Mapping[str, str]) -> bool:
    """More than one process per pod, and nobody else (torchrun, this launcher) started them."""
    return topology.devices > 1 and not topology.torchrun and "LOCAL_RANK" not in env


def shell_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _severity(code: int) -> int:
    if code == contract.EXIT_RETRYABLE:
        return 2
    if code >= 128:
        return 1
    return 0                    # user errors (dataset, flags, OOM): retrying cannot help


def root_cause(exits: Sequence[RankExit]) -> RankExit | None:
    """The exit that decides the pod's code; `exits` in the order the children ended. None when
    every child that ended by itself succeeded."""
    own = [e for e in exits if e.code != 0 and not e.stopped_by_launcher]
    return min(own, key=lambda e: _severity(e.code)) if own else None   # min keeps the first of equals


def terminated_code(codes: Sequence[int]) -> int:
    """The pod's code after a SIGTERM: retryable if every rank stopped at the agreed, checkpointed
    step (or had finished), success if all had finished, 143 if any was cut short."""
    if codes and all(code == contract.EXIT_OK for code in codes):
        return contract.EXIT_OK
    if codes and all(code in (contract.EXIT_OK, contract.EXIT_RETRYABLE) for code in codes):
        return contract.EXIT_RETRYABLE
    return shutdown.EXIT_SIGTERM


def child_command(argv: Sequence[str] | None = None) -> list[str]:
    """This process's own command line again (the console script, `python -m ...` or a script)."""
    import __main__

    argv = list(sys.argv if argv is None else argv)
    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name:
        return [sys.executable, "-m", spec.name, *argv[1:]]
    return [sys.executable, os.path.abspath(argv[0]), *argv[1:]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(env: Mapping[str, str], topology: Topology, local_rank: int, master_addr: str, master_port: int,
              failure_file: Path) -> dict[str, str]:
    child = dict(env)
    child.update({
        "LOCAL_RANK": str(local_rank),
        contract.ENV_NODE_RANK: str(topology.node_rank),
        contract.ENV_NNODES: str(topology.num_nodes),
        contract.ENV_NPROC_PER_NODE: str(topology.devices),
        contract.ENV_WORLD_SIZE: str(topology.world_size),
        contract.ENV_MASTER_ADDR: master_addr,
        contract.ENV_MASTER_PORT: str(master_port),
        ENV_FAILURE_FILE: str(failure_file),
    })
    return child


def report_failure(code: int, message: str, env: Mapping[str, str] | None = None) -> None:
    """Called by every trainer process that fails: a launched child tells its launcher; the pod's
    main process writes the termination message where Kubernetes mounted one."""
    env = os.environ if env is None else env
    target = env.get(ENV_FAILURE_FILE)
    # Best effort: the exit code still says it, and the log has the message.
    with contextlib.suppress(OSError):
        if target:
            # Atomic, so the launcher never reads half a report.
            atomic_write_text(Path(target), json.dumps({"code": code, "message": message[-MAX_MESSAGE_CHARS:]}))
        elif TERMINATION_LOG.is_file() and os.access(TERMINATION_LOG, os.W_OK):
            TERMINATION_LOG.write_text(message[-MAX_MESSAGE_CHARS:])


def _read_report(path: Path) -> tuple[int, str] | None:
    try:
        report = json.loads(path.read_text())
        return int(report["code"]), str(report["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe(exit_: RankExit) -> str:
    where = f"local rank {exit_.local_rank} (global rank {exit_.global_rank})"
    if exit_.message:
        return f"{where} exited with code {exit_.code}: {exit_.message}"
    if exit_.code > 128:
        try:
            name = signal.Signals(exit_.code - 128).name
        except ValueError:
            name = f"signal {exit_.code - 128}"
        return f"{where} was killed by {name} (exit code {exit_.code})"
    return f"{where} exited with code {exit_.code}"


class _Supervisor:
    def __init__(self, procs: dict[int, subprocess.Popen], stop_budget_s: float = 0.0) -> None:
        self.procs = procs
        self.codes: dict[int, int] = {}         # local rank -> shell code, in the order they ended
        self.stopped: set[int] = set()          # ranks this launcher sent SIGTERM while they ran
        self.stop_at: float | None = None
        self.hurry_at: float | None = None
        self.kill_at: float | None = None
        self.stop_budget_s = stop_budget_s      # after a SIGTERM: how long the ranks may take to checkpoint
        self.sigterms = 0                       # SIGTERMs this process got (the pod is going away)
        self.forwarded = 0

    @property
    def terminated(self) -> bool:
        return self.sigterms > 0

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.sigterms += 1

    def _signal_running(self) -> None:
        for rank, proc in self.procs.items():
            if rank not in self.codes and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def _forward_sigterm(self) -> None:
        """Every SIGTERM this process gets goes to each running rank (a repeat means "now" there too)."""
        while self.forwarded < self.sigterms:
            self.forwarded += 1
            self._signal_running()
        if self.kill_at is None:
            self.kill_at = time.monotonic() + max(self.stop_budget_s, 0.0) + 1.0

    def _reap(self) -> None:
        for rank, proc in self.procs.items():
            if rank not in self.codes and (rc := proc.poll()) is not None:
                self.codes[rank] = shell_code(rc)
                if rc != 0 and self.stop_at is None:
                    self.stop_at = time.monotonic() + SETTLE_SECONDS

    def _stop_the_rest(self) -> None:
        now = time.monotonic()
        self.kill_at, self.hurry_at = now + STOP_GRACE_SECONDS, now + HURRY_AFTER_SECONDS
        for rank, proc in self.procs.items():
            if rank not in self.codes and proc.poll() is None:     # an exit not reaped yet is its own
                self.stopped.add(rank)
                proc.send_signal(signal.SIGTERM)

    def run(self) -> None:
        while len(self.codes) < len(self.procs):
            self._reap()
            now = time.monotonic()
            settled = self.stop_at is not None and now >= self.stop_at
            if self.terminated:
                self._forward_sigterm()
            elif self.kill_at is None and settled:
                self._stop_the_rest()
            if self.hurry_at is not None and now >= self.hurry_at:
                self.hurry_at = None
                self._signal_running()
            if self.kill_at is not None and now > self.kill_at:
                for rank, proc in self.procs.items():
                    if rank not in self.codes:
                        proc.kill()
            time.sleep(POLL_SECONDS)


def _rank_exit(topology: Topology, rank: int, code: int, stopped: bool,
               report: tuple[int, str] | None) -> RankExit:
    global_rank = topology.node_rank * topology.devices + rank
    if report is None:
        return RankExit(rank, global_rank, code, stopped)
    # The rank failed by itself and said so, even if the launcher's SIGTERM ended it afterwards.
    return RankExit(rank, global_rank, report[0], False, report[1])


def launch(topology: Topology, env: Mapping[str, str], command: Sequence[str] | None = None) -> int:
    """Run one child per local rank to the end; return the pod's exit code."""
    command = list(command or child_command())
    master_addr = topology.master_addr or "127.0.0.1"
    # Every child must agree on the port; Lightning would otherwise pick a free one per process.
    master_port = topology.master_port or _free_port()
    scratch = Path(tempfile.mkdtemp(prefix="lorakube-ranks-"))
    files = {rank: scratch / f"local-rank-{rank}.json" for rank in range(topology.devices)}
    supervisor = _Supervisor({}, shutdown.stop_budget_seconds(env))
    previous = signal.signal(signal.SIGTERM, supervisor.on_sigterm)
    try:
        for rank in range(topology.devices):
            supervisor.procs[rank] = subprocess.Popen(
                command, env=child_env(env, topology, rank, master_addr, master_port, files[rank]))
        supervisor.run()
        exits = [_rank_exit(topology, rank, code, rank in supervisor.stopped, _read_report(files[rank]))
                 for rank, code in supervisor.codes.items()]
    finally:
        for proc in supervisor.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(scratch, ignore_errors=True)

    if supervisor.terminated:
        code = terminated_code([e.code for e in exits])
        print(f"{contract.TRAINER_COMMAND}: terminated by SIGTERM; local processes exited with "
              f"{[e.code for e in exits]}: exiting with {code}", file=sys.stderr, flush=True)
        return code
    cause = root_cause(exits)
    if cause is None:
        return contract.EXIT_OK
    for other in exits:
        if other is not cause and other.code != 0:
            note = " (stopped by the launcher)" if other.stopped_by_launcher else ""
            print(f"{contract.TRAINER_COMMAND}: {describe(other)}{note}", file=sys.stderr, flush=True)
    message = describe(cause)
    print(f"{contract.TRAINER_COMMAND}: error: {message}", file=sys.stderr, flush=True)
    report_failure(cause.code, message, env={k: v for k, v in env.items() if k != ENV_FAILURE_FILE})
    return cause.code
