"""Two runs of one spec and seed leave byte-identical artifacts (so the manifest's and
status.artifacts' sha256 values show that a run reproduced), and every file the trainer writes has
the mode the umask gives, so a reader running as another user on a shared volume can open it."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from trainer_testlib import sha256

from lorakube_api import contract
from lorakube_trainer.config import parse_config
from lorakube_dev.tiny import build_tiny_pipeline
from lorakube_trainer.train import run

UMASK = 0o027             # not the usual 022, so the expected 0640 cannot come from a hard-coded 0644


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    yield UMASK
    os.umask(old)


def test_same_spec_and_seed_give_byte_identical_artifacts_with_the_umasks_mode(tmp_path: Path, dataset: Path,
                                                                              umask: int) -> None:
    model = build_tiny_pipeline("flux", tmp_path / "tiny-flux")
    out = tmp_path / "out"
    cfg = parse_config([
        "--model_family", "flux", "--model_path", str(model), "--dataset_path", str(dataset),
        "--output_path", str(out), "--height", "32", "--width", "32", "--precision", "32",
        "--steps_per_epoch", "2", "--batch_size", "2", "--random_flip", "--checkpoint_every_n_steps", "1",
        "--validation_inference_steps", "1", "--seed", "5",
        # The original framework's names: the resolved diffusers list is what training_config.json keeps.
        "--lora_target_modules", "a_to_qkv,proj_out",
    ], env={})

    def files() -> dict[str, str]:
        return {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}

    run(cfg, env={})
    first = files()
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in first}
    shutil.rmtree(out)
    run(cfg, env={})
    second = files()

    manifest = json.loads((out / contract.ARTIFACT_MANIFEST).read_text())["files"]
    published = set(manifest) | {contract.ARTIFACT_MANIFEST}
    assert {contract.ARTIFACT_LORA_DIFFUSERS, contract.ARTIFACT_LORA_COMFYUI, contract.ARTIFACT_TRAINING_CONFIG,
            contract.ARTIFACT_METRICS, contract.ARTIFACT_MODEL_CARD} <= published
    for name in sorted(published):
        assert first[name] == second[name], f"{name} differs between two identical runs"
    # Wall-clock figures are kept apart, outside the manifest, and are the only published-folder
    # file allowed to differ; checkpoints are not artifacts, but their LoRA tensors reproduce too.
    assert contract.ARTIFACT_TIMINGS in first and contract.ARTIFACT_TIMINGS not in manifest
    trainable = [n for n in first if n.endswith("trainable.safetensors")]
    assert trainable and all(first[n] == second[n] for n in trainable)

    config = json.loads((out / contract.ARTIFACT_TRAINING_CONFIG).read_text())
    assert config["lora_target_modules"] == ["a_to_qkv", "proj_out"]
    assert config["resolved_lora_target_modules"] == [
        "transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k", "transformer_blocks.*.attn.to_v",
        "single_transformer_blocks.*.proj_out"]

    expected = 0o666 & ~umask
    assert modes and {name: mode for name, mode in modes.items() if mode != expected} == {}
