"""The SIGTERM handler: Lightning's (which runs a collective inside the handler) never gets installed;
outside training the handler ends the process at once with 143; inside, it records a request that
the ranks combine after each step (agree_to_stop), with a deadline and a second SIGTERM as the way
out."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import lightning.pytorch as pl

from lorakube_api import contract
from lorakube_trainer import shutdown


def test_lightning_does_not_replace_the_handler_when_fit_starts() -> None:
    before = signal.getsignal(signal.SIGTERM)
    try:
        shutdown.install()
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        shutdown.keep_lightning_off_sigterm(trainer)
        # What Trainer._run calls right before the first step.
        trainer._signal_connector.register_signal_handlers()
        assert signal.getsignal(signal.SIGTERM) is shutdown.exit_now
        assert trainer.received_sigterm is False
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_exits_143_at_once_even_inside_a_blocking_call() -> None:
    code = ("import sys, time; from lorakube_trainer import shutdown; shutdown.install(); "
            "print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    assert time.monotonic() - sent < 5
    assert "received SIGTERM" in proc.stderr.read()


# --- during training: a SIGTERM asks for a stop; a deadline or a second SIGTERM ends at once ----

def _graceful_child(grace: str, after: str = "time.sleep(60)") -> subprocess.Popen:
    """A process in the training loop's mode: SIGTERM only records a request."""
    code = ("import os, sys, time; from lorakube_trainer import shutdown; shutdown.install(); "
            f"shutdown.begin_graceful({{'LORAKUBE_TERMINATION_GRACE_SECONDS': {grace!r}}}); "
            f"print('ready', flush=True); {after}")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_sigterm_in_training_only_asks_and_the_step_goes_on() -> None:
    loop = ("\nfor _ in range(400):\n    time.sleep(0.01)\n    if shutdown.stop_requested(): break\n"
            "print('asked', shutdown.stop_requested(), flush=True); sys.exit(75)")
    proc = _graceful_child("60", loop)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 75             # the process chose its own exit
    assert proc.stdout.read().strip() == "asked True"
    assert "finishing the current step" in proc.stderr.read()


def test_a_copy_of_the_signal_is_ignored_but_a_later_second_sigterm_ends_at_once() -> None:
    proc = _graceful_child("60")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)               # the launcher forwarding what the group already got
    time.sleep(shutdown.REPEAT_AFTER_SECONDS + 0.3)
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    assert time.monotonic() - sent < 5
    assert "second SIGTERM" in proc.stderr.read()


def test_the_deadline_ends_a_rank_stuck_in_a_blocking_call() -> None:
    # Grace 6.5 s -> 1.5 s to checkpoint; the main thread sits in a C call and never comes back.
    proc = _graceful_child(str(shutdown.DEADLINE_MARGIN_SECONDS + 1.5))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    assert 1.4 < time.monotonic() - sent < 8
    assert "grace period is almost over" in proc.stderr.read()


def test_a_grace_period_too_short_for_a_checkpoint_exits_at_once() -> None:
    proc = _graceful_child(str(shutdown.DEADLINE_MARGIN_SECONDS))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    assert time.monotonic() - sent < 5
    assert "too short to checkpoint" in proc.stderr.read()


def test_grace_seconds_come_from_the_operator_or_kubernetes_default() -> None:
    env = contract.ENV_TERMINATION_GRACE
    assert shutdown.grace_seconds({env: "120"}) == 120
    assert shutdown.stop_budget_seconds({env: "120"}) == 120 - shutdown.DEADLINE_MARGIN_SECONDS
    for bad in ({}, {env: ""}, {env: "soon"}, {env: "-1"}):
        assert shutdown.grace_seconds(bad) == contract.KUBERNETES_DEFAULT_GRACE_SECONDS


# --- the agreement: one all-reduce after each step, the same answer on every rank -------------

AGREE = """
import os, sys, torch.distributed as dist
from lorakube_trainer import shutdown
dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
asks = [a == "1" for a in sys.argv[3].split(",")]     # this rank's request after each step
print(",".join(str(int(shutdown.agree_to_stop(ask))) for ask in asks), flush=True)
dist.destroy_process_group()
"""


def test_ranks_agree_to_stop_when_any_of_them_asked() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    # Rank 1 alone is signalled before step 2; rank 0 only before step 4.
    asks = {0: "0,0,0,1", 1: "0,1,1,1"}
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(rank), port, asks[rank]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [out.strip() for out, _ in outs] == ["0,1,1,1", "0,1,1,1"]
    assert shutdown.agree_to_stop(True) is True and shutdown.agree_to_stop(False) is False   # one process


def test_a_worker_forked_during_training_outlives_a_group_sigterm_and_ends_with_its_parent() -> None:
    # The node signals the container's whole process group; a DataLoader worker dying of it would
    # fail the step its parent is finishing.
    code = ("import os, signal, sys, time; from lorakube_trainer import shutdown; shutdown.install(); "
            "shutdown.begin_graceful({'LORAKUBE_TERMINATION_GRACE_SECONDS': '60'}); pid = os.fork()\n"
            "if pid == 0:\n    time.sleep(1.0); os._exit(7)\n"
            "print('ready', flush=True); os.killpg(0, signal.SIGTERM); time.sleep(0.2)\n"
            "print(os.waitpid(pid, 0)[1] >> 8, shutdown.stop_requested(), flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split() == ["ready", "7", "True"]      # the worker ran on and exited by itself


def test_reset_disarms_the_deadline_of_a_request_handled_in_process() -> None:
    # A process that trains again after a graceful stop (a test run, an embedding application)
    # must not be killed by the first request's deadline thread later on.
    code = ("import os, signal, time; from lorakube_trainer import shutdown; shutdown.install(); "
            "shutdown.begin_graceful({'%s': '6'}); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1); "
            "shutdown.reset(); time.sleep(2.5); print('alive', flush=True)" % contract.ENV_TERMINATION_GRACE)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "alive" in done.stdout, done.stderr
