"""Fixtures for the general trainer: a toy model (see toy_family.py), small datasets, config builders."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toy_family import save_toy_model  # noqa: E402
from trainer_testlib import write_dataset  # noqa: E402

from lorakube_trainer.config import TrainConfig, parse_config  # noqa: E402


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_model(tmp_path_factory.mktemp("toy-model"))



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
