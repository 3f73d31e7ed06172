"""`kubectl explain ltj.spec.training.stepsPerEpoch` and `lorakube-train --help` say the same thing
(contract.STEPS_PER_EPOCH_MEANING), and the trainer's counters follow it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from lorakube_api import contract
from lorakube_trainer.config import parse_config
from lorakube_trainer.data import DataPosition, micro_batches_per_epoch

ROOT = Path(__file__).resolve().parents[3]
CRD = ROOT / "crds" / "loratrainingjobs.lorakube.io.yaml"


def _words(text: str) -> str:
    return " ".join(text.split())


def test_crd_description_states_the_shared_meaning() -> None:
    (version,) = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    training = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    assert contract.STEPS_PER_EPOCH_MEANING in _words(training["properties"]["stepsPerEpoch"]["description"])


def test_trainer_help_states_the_shared_meaning() -> None:
    # The real CLI, as a user runs it; argparse wraps lines, so compare word sequences.
    proc = subprocess.run([sys.executable, "-m", "lorakube_trainer", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "100"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    help_text = _words(proc.stdout)
    flag = contract.TRAINING_FLAGS["stepsPerEpoch"]
    assert f"{flag} {flag.upper().lstrip('-')} {contract.STEPS_PER_EPOCH_MEANING}" in help_text


def test_counters_follow_the_meaning() -> None:
    base = ["--model_family", "flux", "--model_path", "m", "--dataset_path", "d", "--output_path", "o"]
    cfg = parse_config(base + ["--steps_per_epoch", "3", "--max_epochs", "2", "--accumulate_grad_batches", "4"],
                       env={})
    assert cfg.total_steps == 3 * 2                                 # progress totalSteps
    assert micro_batches_per_epoch(cfg.steps_per_epoch, cfg.accumulate_grad_batches) == 3 * 4   # per process
    assert [cfg.epoch_of_step(s) for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    # A checkpoint after step 4 resumes one step (4 micro-batches) into epoch 1.
    assert DataPosition.after_optimizer_steps(4, 4, 3) == DataPosition(epoch=1, batch_in_epoch=4)
