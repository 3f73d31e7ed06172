"""What the trainer benchmarks share: a markdown table, the machine's name, a tiny dataset."""

from __future__ import annotations

import logging
import os
import platform
import statistics
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = REPO / "examples" / "dataset" / "train"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo; where there is none (not Linux), what platform says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def quiet() -> None:
    """Lightning's banner lines and the trainer's info logs would bury the table."""
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lorakube_trainer", "diffusers",
                 "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def one_image_dataset(root: Path) -> Path:
    """The first example image, as it is (the trainer decodes and resizes it), as a one-record
    dataset: every step of either loop sees the same image and caption."""
    import shutil

    folder = root / "train"
    folder.mkdir(parents=True, exist_ok=True)
    first = sorted(p for p in EXAMPLE_IMAGES.iterdir() if p.suffix == ".png")[0]
    shutil.copy(first, folder / "img.png")
    (folder / "metadata.csv").write_text("file_name,text\nimg.png,a red circle on a dark background\n")
    return root
