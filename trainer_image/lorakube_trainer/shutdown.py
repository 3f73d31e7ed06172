"""SIGTERM ends a trainer process at once with exit code 143, without talking to any other rank.

A gang restart, a suspend and a job deletion all delete every pod of a job together, so every rank
gets SIGTERM at about the same moment, each somewhere else in its step. Lightning's own handler
(2.x) runs a `dist.broadcast` inside the signal handler and later a broadcast + barrier in the
loop; a rank interrupted in the middle of another collective then waits for a peer that is
waiting for something else, until the collective timeout (raised to 30 minutes after the join)
or the kubelet's SIGKILL. Nothing needs that coordination: checkpoints are written into a
temporary folder and published by renaming it after the COMPLETE marker is written
(checkpoint.finalize), and artifacts publish their manifest last, so a process that stops at any
instruction leaves either a whole checkpoint or none, and the next attempt resumes from the newest
whole one. So the handler flushes what is buffered and leaves with `os._exit(143)`.

Standard library only: the CLI installs the handler before it imports torch, so a SIGTERM during
the (long) model load ends the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

EXIT_SIGTERM = 128 + signal.SIGTERM


def _flush_everything() -> None:
    # Best effort: the handler may have interrupted a write on one of these streams, and a
    # re-entrant flush of a buffered stream raises instead of blocking.
    # Nothing may stop the exit.
    for flushable in (*logging.getLogger().handlers, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            flushable.flush()


def exit_now(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler: no locks, no collectives, no waiting."""
    _flush_everything()
    pid = os.getpid()
    # os.write: unbuffered and lock-free, so it cannot deadlock on a stream the main thread holds.
    os.write(2, f"lorakube-train: received SIGTERM (pid {pid}): exiting with {EXIT_SIGTERM} now; the newest "
                f"complete checkpoint stays valid\n".encode())
    os._exit(EXIT_SIGTERM)


def install() -> None:
    """Make `exit_now` the SIGTERM handler (only the main thread may set handlers; a caller on
    another thread, e.g. an embedding application, keeps its own)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_now)


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
