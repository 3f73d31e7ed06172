"""Fixtures for the family tests: every family's tiny pipeline (built once per session) and the example
dataset's images at 64 px."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorakube_trainer.families import FAMILY_NAMES
from lorakube_dev.tiny import build_tiny_pipeline

EXAMPLE_DATASET = Path(__file__).resolve().parents[3] / "examples" / "dataset"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: build_tiny_pipeline(name, root / name) for name in FAMILY_NAMES}


def _to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop, scale to [-1, 1], CHW."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


@pytest.fixture(scope="session")
def example_batch() -> tuple[torch.Tensor, list[str]]:
    """The first two example images at 64x64 with their captions."""
    with open(EXAMPLE_DATASET / "train" / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:2]
    pixels = torch.stack([_to_pixels(Image.open(EXAMPLE_DATASET / "train" / r["file_name"]), 64) for r in rows])
    return pixels, [r["text"] for r in rows]
