"""SIGTERM to every rank at once (a gang restart, a suspend, a job deletion) ends every process with
143 within seconds, however the signal meets the ranks' collectives.

The number of repetitions is LORAKUBE_SIGTERM_REPEATS (default 2); `make soak` runs 20.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_multiprocess import base_env, flags, free_port, start, tiny_flux  # noqa: F401 - tiny_flux is a fixture

from lorakube_api import contract

REPEATS = int(os.environ.get("LORAKUBE_SIGTERM_REPEATS", "2"))
EXIT_BUDGET_S = 5.0          # what the issue asks: every pod exits within 5 s
OBSERVE_S = 40.0             # long enough to see a hang (kubelet's default grace period is 30 s)
START_TIMEOUT_S = 240.0


def _shell_code(returncode: int) -> int:
    """What a container runtime reports: a process killed by signal N exits 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _wait_until_training(probe: Path, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all((probe / f"rank-{r}.training").exists() for r in (0, 1)):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("the ranks did not both start training:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
        time.sleep(0.05)


def terminate_both_while_training(model: Path, tmp: Path, delay_s: float) -> list[tuple[int, float]]:
    """Start a 2-pod gang, wait until both ranks train, SIGTERM both process groups back to back
    (as the node does for each deleted pod); return each pod's (exit code, seconds to exit)."""
    tmp.mkdir(parents=True)
    port, probe, procs, logs = free_port(), tmp / "probe", [], []
    for rank in (0, 1):
        env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank), NNODES="2",
                       NPROC_PER_NODE="1", WORLD_SIZE="2", PROBE_DIR=str(probe),
                       **{contract.ENV_RENDEZVOUS_TIMEOUT: "120"})
        logs.append(tmp / f"rank{rank}.log")
        # Long enough never to finish; a checkpoint every 2 steps, so the signal also lands mid-save.
        args = flags(model, tmp / f"out{rank}", "--checkpoint_dir", str(tmp / "ck"), "--steps_per_epoch", "5000",
                     "--checkpoint_every_n_steps", "2")
        procs.append(start(args, env, logs[-1]))
    _wait_until_training(probe, procs, logs)
    time.sleep(delay_s)
    sent = time.monotonic()
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    results = []
    for p in procs:
        try:
            code = p.wait(timeout=max(0.0, sent + OBSERVE_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            code = p.wait()
            results.append((_shell_code(code), float("inf")))
            continue
        results.append((_shell_code(code), time.monotonic() - sent))
    return results


def test_sigterm_to_every_rank_at_once_exits_143_promptly(tiny_flux: Path, tmp_path: Path) -> None:  # noqa: F811
    outcomes = []
    for i in range(REPEATS):
        # Vary where in a step the signal lands (forward, all-reduce, checkpoint write).
        outcomes.append(terminate_both_while_training(tiny_flux, tmp_path / f"try{i}", delay_s=(i % 7) * 0.15))
    codes = [code for run in outcomes for code, _ in run]
    slowest = max(seconds for run in outcomes for _, seconds in run)
    print(f"SIGTERM soak: {REPEATS} runs, {codes.count(143)}/{len(codes)} processes exited 143, "
          f"slowest {slowest:.2f} s; per run {outcomes}")
    assert all(code == 128 + signal.SIGTERM for code in codes), outcomes
    assert slowest < EXIT_BUDGET_S, outcomes
