"""Fixtures of the image tier: one working container per image and test module (see imagelib)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from imagelib import ImageContainer, image_container


@pytest.fixture(scope="module")
def operator_image() -> Iterator[ImageContainer]:
    yield from image_container("lorakube-operator")


@pytest.fixture(scope="module")
def trainer_image() -> Iterator[ImageContainer]:
    yield from image_container("lorakube-trainer")
