"""Validation images: one image per prompt with a fixed seed, laid out as a grid PNG.

Sampling runs inside torch.random.fork_rng, so drawing validation noise never shifts the training
RNG stream (a run with validation every N steps trains exactly like one without).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .config import TrainConfig
from .families.base import Family


def generate_images(family: Family, pipe: Any, prompts: Sequence[str], *, seed: int, height: int, width: int,
                    steps: int) -> list[Image.Image]:
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        return [family.generate(pipe, prompt, seed, height, width, steps).convert("RGB") for prompt in prompts]


def make_grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Rows of equally sized images -> one image (row i above row i + 1)."""
    cell_w = max(img.width for row in rows for img in row)
    cell_h = max(img.height for row in rows for img in row)
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (cell_w * columns, cell_h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (c * cell_w, r * cell_h))
    return grid


def save_grid(rows: Sequence[Sequence[Image.Image]], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows).save(out, format="PNG")
    return out


def save_validation_row(family: Family, pipe: Any, cfg: TrainConfig, out: Path) -> Path:
    images = generate_images(family, pipe, cfg.validation_prompts, seed=cfg.seed, height=cfg.height,
                             width=cfg.width, steps=cfg.validation_inference_steps)
    return save_grid([images], out)
