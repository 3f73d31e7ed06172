"""Exact resume on the real (tiny, random) diffusers pipelines: FLUX (rectified flow) and a DDPM
family. An interrupted run plus `--resume auto` must write a LoRA file bit-identical to an
uninterrupted run with the same seed, and that file must load into a fresh pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_testlib import CrashAt, SimulatedNodeLoss, lora_file_identity

from lorakube import contract
from lorakube_trainer.config import parse_config
from lorakube_trainer.tiny import build_tiny_pipeline
from lorakube_trainer.train import run

SIZES = {"flux": 32, "kolors": 64, "hunyuan-dit": 32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_pipeline(family, root / family)
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["flux", "kolors"])
def test_resume_is_bit_identical(family: str, tiny, dataset: Path, tmp_path: Path) -> None:
    size = str(SIZES[family])

    def cfg(out: str):
        return parse_config([
            "--model_family", family, "--model_path", str(tiny(family)), "--dataset_path", str(dataset),
            "--output_path", str(tmp_path / out), "--height", size, "--width", size, "--precision", "32",
            "--steps_per_epoch", "3", "--max_epochs", "2", "--batch_size", "2", "--random_flip",
            "--checkpoint_every_n_steps", "2", "--validation_inference_steps", "2", "--seed", "11",
        ], env={})

    whole = run(cfg("whole"), env={})
    with pytest.raises(SimulatedNodeLoss):
        run(cfg("cut"), env={}, extra_callbacks=[CrashAt(3)])   # last checkpoint: step 2, mid-epoch 0
    resumed = run(cfg("cut"), env={})
    assert resumed.steps_done == whole.steps_done == 6
    name = contract.ARTIFACT_LORA_DIFFUSERS
    assert lora_file_identity(tmp_path / "whole" / name) == lora_file_identity(tmp_path / "cut" / name)
    for key, tensor in whole.final_lora.items():
        assert tensor.equal(resumed.final_lora[key]), key
    assert (tmp_path / "cut" / contract.ARTIFACT_LORA_COMFYUI).is_file()
