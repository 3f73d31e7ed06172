"""Fixtures for the general trainer: a toy model (see toy_family.py), small datasets, config builders."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from toy_family import save_toy_model  # noqa: E402

from lorakube_trainer.config import TrainConfig, parse_config  # noqa: E402

EXAMPLE_DATASET = Path(__file__).resolve().parents[3] / "examples" / "dataset"


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_model(tmp_path_factory.mktemp("toy-model"))


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


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", [(48, 32), (32, 48), (40, 40), (64, 32), (32, 32)])


@pytest.fixture
def make_cfg(tmp_path: Path, toy_model: Path, dataset: Path) -> Callable[..., TrainConfig]:
    """parse_config over a small base command line plus the test's extra flags."""

    def build(*extra: str, env: dict[str, str] | None = None, output: Path | None = None) -> TrainConfig:
        argv = ["--model_family", "flux", "--model_path", str(toy_model), "--dataset_path", str(dataset),
                "--output_path", str(output or tmp_path / "out"), "--height", "16", "--width", "16",
                "--precision", "32", "--steps_per_epoch", "4", "--validation_inference_steps", "2", *extra]
        return parse_config(argv, env=env or {})

    return build
