"""The one file writer: equal content gives equal bytes, the umask decides the mode, and a failed
write leaves neither a torn file nor a temporary one behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakube_trainer.files import atomic_write_bytes, safetensors_bytes, save_safetensors

TENSORS = {"b.lora_B.weight": torch.arange(6.0).view(3, 2), "a.lora_A.weight": torch.ones(2, 4, dtype=torch.bfloat16)}
METADATA = {"lora_rank": "2", "lora_alpha": "4.0", "format": "pt", "lorakube_family": "flux", "z": "last"}


def test_metadata_order_does_not_change_the_bytes_and_the_file_loads_back(tmp_path: Path) -> None:
    reordered = dict(reversed(list(METADATA.items())))
    # safetensors itself orders the metadata by a per-process hash seed; several encodings in one
    # process already come out in different orders.
    assert len({safetensors_bytes(TENSORS, m) for m in [METADATA, reordered] * 4}) == 1
    path = tmp_path / "lora.safetensors"
    save_safetensors(TENSORS, path, METADATA)
    loaded = load_file(str(path))
    assert loaded.keys() == TENSORS.keys() and all(torch.equal(loaded[k], v) for k, v in TENSORS.items())
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == METADATA


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_mode_comes_from_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        save_safetensors(TENSORS, tmp_path / "lora.safetensors", METADATA)
        atomic_write_bytes(tmp_path / "manifest.json", b"{}")
    finally:
        os.umask(old)
    for name in ("lora.safetensors", "manifest.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    atomic_write_bytes(path, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())        # type: ignore[arg-type]
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
