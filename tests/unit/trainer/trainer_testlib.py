"""Helpers shared by the trainer tests (a uniquely named module: `conftest` is ambiguous across folders)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from PIL import Image

EXAMPLE_DATASET = Path(__file__).resolve().parents[3] / "examples" / "dataset"


def write_dataset(root: Path, sizes: list[tuple[int, int]], layout: str = "train") -> Path:
    """Images of distinct colours (so a test can tell which one it got) + metadata.csv."""
    folder = root / "train" if layout == "train" else root
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["file_name,text"]
    for i, (w, h) in enumerate(sizes):
        img = Image.new("RGB", (w, h), (40 * i % 256, 255 - 40 * i % 256, 90))
        # A bright left column makes horizontal flips and crops visible.
        for y in range(h):
            img.putpixel((0, y), (255, 255, 255))
        img.save(folder / f"img{i}.png")
        lines.append(f"img{i}.png,caption {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


class SimulatedNodeLoss(Exception):
    """Raised inside a training step to stop a run the way a lost node would."""


class CrashAt(pl.Callback):
    """Simulates a pod killed right after optimizer step `step` (before any later checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if pl_module.absolute_step == self.step:
            raise SimulatedNodeLoss(f"after step {self.step}")


def assert_toy_run_resumes_bit_identically(whole: Any, whole_cfg: Any, cut_cfg: Any, crash_step: int) -> Any:
    """Run `cut_cfg` on the toy family until a simulated node loss after `crash_step`, then again from
    its newest checkpoint, and check its LoRA equals the uninterrupted `whole` run's, in memory and as
    the file's bytes. Returns the resumed run."""
    import pytest
    import torch
    from toy_family import ToyFamily

    from lorakube_api import contract
    from lorakube_trainer.train import run

    with pytest.raises(SimulatedNodeLoss):
        run(cut_cfg, env={}, family=ToyFamily(), extra_callbacks=[CrashAt(crash_step)])
    resumed = run(cut_cfg, env={}, family=ToyFamily())
    for key, tensor in whole.final_lora.items():
        assert torch.equal(tensor, resumed.final_lora[key]), key
    name = contract.ARTIFACT_LORA_DIFFUSERS
    assert sha256(Path(whole_cfg.output_path) / name) == sha256(Path(cut_cfg.output_path) / name)
    return resumed


def sha256(path: Path) -> str:
    """Whole-file hash: the trainer writes equal LoRAs as equal bytes (files.safetensors_bytes)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
