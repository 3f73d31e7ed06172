"""Write the example dataset: five small PNGs of coloured shapes plus train/metadata.csv.

The images are drawn with PIL, so the dataset is reproducible byte for byte; sizes and aspect
ratios vary on purpose so resize/crop code paths get exercised.

    python examples/make_example_dataset.py            # writes examples/dataset/
    python examples/make_example_dataset.py --out DIR
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image, ImageDraw

# (file name, size, background, shape, colour, caption)
IMAGES = (
    ("red_circle.png", (96, 96), "#1e1e28", "circle", "#e03030", "a red circle on a dark background"),
    ("blue_square.png", (128, 80), "#f0f0f0", "square", "#2050d0", "a blue square on a light background"),
    ("yellow_triangle.png", (72, 120), "#303a50", "triangle", "#f0d020", "a yellow triangle on a blue background"),
    ("green_stripes.png", (112, 112), "#ffffff", "stripes", "#20a040", "green stripes on a white background"),
    ("purple_dots.png", (144, 96), "#202020", "dots", "#a040c0", "a grid of purple dots on a black background"),
)


def draw(size: tuple[int, int], background: str, shape: str, colour: str) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    m = min(w, h)
    box = ((w - 0.7 * m) / 2, (h - 0.7 * m) / 2, (w + 0.7 * m) / 2, (h + 0.7 * m) / 2)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        x0, y0, x1, y1 = box
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "stripes":
        for x in range(0, w, 16):
            d.rectangle((x, 0, x + 7, h), fill=colour)
    elif shape == "dots":
        for y in range(8, h, 20):
            for x in range(8, w, 20):
                d.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def write_dataset(out: Path) -> None:
    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    with open(train / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file_name", "text"])
        for name, size, background, shape, colour, caption in IMAGES:
            draw(size, background, shape, colour).save(train / name, optimize=True)
            writer.writerow([name, caption])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "dataset")
    write_dataset(parser.parse_args().out)


if __name__ == "__main__":
    main()
