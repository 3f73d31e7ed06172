"""Model families: `get_family(name)` returns the object that knows everything family-specific."""

from __future__ import annotations

from .base import Family
from .flux import Flux
from .flux2 import Flux2Dev, Flux2Klein
from .hunyuan_dit import HunyuanDiT
from .kolors import Kolors
from .qwen_image import QwenImage
from .sd3 import SD3
from .z_image import ZImage

_FAMILIES: dict[str, type[Family]] = {
    cls.name: cls for cls in (Flux, SD3, Kolors, HunyuanDiT, Flux2Klein, ZImage, QwenImage, Flux2Dev)
}
FAMILY_NAMES: tuple[str, ...] = tuple(_FAMILIES)


def get_family(name: str) -> Family:
    try:
        return _FAMILIES[name]()
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; valid names: {', '.join(FAMILY_NAMES)}") from None


__all__ = ["FAMILY_NAMES", "Family", "get_family"]
