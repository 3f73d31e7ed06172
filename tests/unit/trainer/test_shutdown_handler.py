"""The SIGTERM handler: Lightning's (which runs a collective inside the handler) never gets installed,
and the handler ends the process at once with 143."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import lightning.pytorch as pl

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
