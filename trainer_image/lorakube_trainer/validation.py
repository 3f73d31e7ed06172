"""Validation images: one image per prompt with a fixed seed, laid out as a grid PNG.

Sampling runs inside torch.random.fork_rng, so drawing validation noise never shifts the training
RNG stream (a run with validation every N steps trains exactly like one without).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from .config import TrainConfig
from .families.base import Family


def generate_images(family: Family, pipe: Any, prompts: Sequence[str], *, seed: int, height: int, width: int,
                    steps: int) -> list[Image.Image]:
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        return [family.generate(pipe, prompt, seed, height, width, steps).convert("RGB") for prompt in prompts]


# Cells are upscaled (nearest neighbour, so no detail is invented) until they are at least this
# tall: a 64 px tiny-model sample or a 512 px one both stay legible next to their labels.
MIN_CELL_PX = 256
HEADER_PX = 28
LABEL_PX = 96


def make_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (),
              column_labels: Sequence[str] = ()) -> Image.Image:
    """Rows of equally sized images -> one labelled image (row i above row i + 1).

    With labels, a header line names each column (the prompt) and a left margin names each row
    (e.g. "base" / "+ LoRA"), so the file explains itself without the training config beside it.
    """
    cell_w = max(img.width for row in rows for img in row)
    cell_h = max(img.height for row in rows for img in row)
    scale = max(1, -(-MIN_CELL_PX // cell_h)) if (row_labels or column_labels) else 1
    cell_w, cell_h = cell_w * scale, cell_h * scale
    top = HEADER_PX if column_labels else 0
    left = LABEL_PX if row_labels else 0
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (left + cell_w * columns, top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for c, label in enumerate(column_labels):
        draw.text((left + c * cell_w + 4, 8), _fit(draw, font, label, cell_w - 8), fill="black", font=font)
    for r, row in enumerate(rows):
        if r < len(row_labels):
            draw.text((4, top + r * cell_h + cell_h // 2), _fit(draw, font, row_labels[r], LABEL_PX - 8),
                      fill="black", font=font)
        for c, img in enumerate(row):
            cell = img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img
            grid.paste(cell, (left + c * cell_w, top + r * cell_h))
    return grid


def _fit(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, text: str, width: int) -> str:
    """The text, cut with an ellipsis so it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_grid(rows: Sequence[Sequence[Image.Image]], out: Path, row_labels: Sequence[str] = (),
              column_labels: Sequence[str] = ()) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, row_labels, column_labels).save(out, format="PNG")
    return out


def save_validation_row(family: Family, pipe: Any, cfg: TrainConfig, out: Path) -> Path:
    images = generate_images(family, pipe, cfg.validation_prompts, seed=cfg.seed, height=cfg.height,
                             width=cfg.width, steps=cfg.validation_inference_steps)
    return save_grid([images], out, row_labels=["+ LoRA"], column_labels=cfg.validation_prompts)
