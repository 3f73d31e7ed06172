"""Helpers shared by the trainer tests (a uniquely named module: `conftest` is ambiguous across folders)."""

from __future__ import annotations

import hashlib
import json
import struct
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


def lora_file_identity(path: Path) -> tuple[str, dict[str, str]]:
    """(sha256 of the tensor bytes and their index, metadata). The safetensors writer orders
    metadata keys in its header arbitrarily (a Rust HashMap), so whole-file hashes of two equal
    LoRAs can differ; the tensor section and the parsed metadata cannot."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    metadata = header.pop("__metadata__", {})
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + data[8 + size:]).hexdigest()
    return digest, metadata
