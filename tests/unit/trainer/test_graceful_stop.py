"""Zero lost steps on SIGTERM, in one process on the toy family: the signal lands inside a step,
the step completes, a checkpoint at that step is published, GracefulStop says where the next
attempt starts, and that attempt ends with the uninterrupted run's LoRA, byte for byte."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import pytest
import torch
from trainer_testlib import sha256

from lorakube_api import contract
from lorakube_trainer import checkpoint as ckpt
from lorakube_trainer import shutdown
from lorakube_trainer.train import run

from toy_family import ToyFamily

GRACE = {contract.ENV_TERMINATION_GRACE: "60"}


class SigtermDuring(pl.Callback):
    """Sends this process SIGTERM at the start of optimizer step `step` (before its forward pass)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.sent = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.sent and pl_module.absolute_step + 1 == self.step:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def lorakube_handler() -> Iterator[None]:
    """What the CLI installs; the pytest process gets its own handler back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    shutdown.install()
    try:
        yield
    finally:
        shutdown.reset()
        signal.signal(signal.SIGTERM, before)


def _steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


def test_sigterm_inside_a_step_checkpoints_that_step_and_the_resume_loses_nothing(
        make_cfg, tmp_path: Path, lorakube_handler: None) -> None:
    args = ("--max_epochs", "2", "--random_flip", "--checkpoint_every_n_steps", "100", "--output_formats", "diffusers")
    whole = run(make_cfg(*args, output=tmp_path / "whole"), env=GRACE, family=ToyFamily())
    cut = make_cfg(*args, output=tmp_path / "cut")
    with pytest.raises(shutdown.GracefulStop) as stopped:
        run(cut, env=GRACE, family=ToyFamily(), extra_callbacks=[SigtermDuring(3)])
    assert stopped.value.step == 3
    assert "the next attempt resumes at step 4" in str(stopped.value)
    # Step 3 ran to its end and is the newest complete checkpoint; no periodic one was due.
    assert [step for step, _ in ckpt.list_checkpoints(Path(cut.checkpoint_dir))] == [3]
    assert ckpt.read_marker(ckpt.find_latest_complete(Path(cut.checkpoint_dir)))["step"] == 3
    assert _steps(Path(cut.output_path) / contract.ARTIFACT_METRICS) == [1, 2, 3]

    shutdown.reset()
    resumed = run(cut, env=GRACE, family=ToyFamily())
    assert resumed.steps_done == whole.steps_done == 8
    assert _steps(Path(cut.output_path) / contract.ARTIFACT_METRICS) == list(range(1, 9))
    for key, tensor in whole.final_lora.items():
        assert torch.equal(tensor, resumed.final_lora[key]), key
    name = contract.ARTIFACT_LORA_DIFFUSERS
    assert sha256(tmp_path / "whole" / name) == sha256(tmp_path / "cut" / name)


def test_with_checkpoints_off_there_is_nothing_to_save_so_sigterm_stays_immediate(
        make_cfg, tmp_path: Path, lorakube_handler: None) -> None:
    """Checked without a signal: checkpoints off leaves the handler in its exit-at-once mode."""
    seen: list[bool] = []

    class Look(pl.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            seen.append(shutdown._state.graceful)

    run(make_cfg("--checkpoint_every_n_steps", "0", "--output_formats", "diffusers"), env=GRACE,
        family=ToyFamily(), extra_callbacks=[Look()])
    assert seen and not any(seen)
    # And with them on, the mode holds only while the loop runs.
    seen.clear()
    run(make_cfg("--checkpoint_every_n_steps", "4", "--output_formats", "diffusers", output=tmp_path / "on"),
        env=GRACE, family=ToyFamily(), extra_callbacks=[Look()])
    assert seen and all(seen)
    assert shutdown._state.graceful is False
