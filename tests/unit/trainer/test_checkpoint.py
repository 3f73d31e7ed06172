"""Checkpoint files: atomic publication, half-written folders ignored, newest complete one chosen,
corrupt files detected, pruning, RNG capture/restore."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakube_api import contract
from lorakube_trainer import checkpoint as ckpt


def _write(root: Path, step: int, *, ranks: int = 1) -> Path:
    tmp = ckpt.prepare_tmp(root, step)
    ckpt.write_trainable(tmp, {"a.lora_A.weight": torch.full((2, 3), float(step))})
    ckpt.write_state(tmp, {"step": step, "optimizer": {"state": {}}})
    for rank in range(ranks):
        ckpt.write_rng(tmp, rank)
    return ckpt.finalize(root, step)


def test_layout_and_marker(tmp_path: Path) -> None:
    folder = _write(tmp_path, 120, ranks=2)
    assert folder.name == contract.checkpoint_dir_name(120) == "step-000000120"
    marker = json.loads((folder / contract.CHECKPOINT_COMPLETE_MARKER).read_text())
    assert marker["step"] == 120
    assert set(marker["files"]) == {ckpt.TRAINABLE_FILE, ckpt.STATE_FILE, ckpt.rng_file(0), ckpt.rng_file(1)}
    assert not ckpt.tmp_dir(tmp_path, 120).exists()
    loaded = ckpt.load(folder)
    assert loaded.step == 120 and torch.equal(loaded.trainable["a.lora_A.weight"], torch.full((2, 3), 120.0))
    assert loaded.rng_for(1) is not None and loaded.rng_for(2) is None


def test_newest_complete_wins_and_half_written_ones_are_ignored(tmp_path: Path) -> None:
    _write(tmp_path, 10)
    _write(tmp_path, 20)
    # A crash between writing files and the marker: a published-looking folder without COMPLETE.json.
    half = tmp_path / contract.checkpoint_dir_name(30)
    half.mkdir()
    (half / ckpt.TRAINABLE_FILE).write_bytes(b"partial")
    # A crash before the rename: only the temporary folder exists.
    tmp = ckpt.prepare_tmp(tmp_path, 40)
    ckpt.write_state(tmp, {"step": 40})
    assert ckpt.find_latest_complete(tmp_path) == tmp_path / contract.checkpoint_dir_name(20)
    assert ckpt.resolve_resume("auto", tmp_path).step == 20


def test_a_corrupted_file_makes_the_checkpoint_incomplete(tmp_path: Path) -> None:
    _write(tmp_path, 10)
    newest = _write(tmp_path, 20)
    with (newest / ckpt.STATE_FILE).open("ab") as fh:
        fh.write(b"bit rot")
    assert ckpt.resolve_resume("auto", tmp_path).step == 10
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(newest), tmp_path)


def test_resume_modes(tmp_path: Path) -> None:
    assert ckpt.resolve_resume("auto", tmp_path / "nothing-yet") is None
    folder = _write(tmp_path, 5)
    assert ckpt.resolve_resume("never", tmp_path) is None
    assert ckpt.resolve_resume(str(folder), tmp_path).step == 5
    with pytest.raises(ckpt.CheckpointError, match="not a folder"):
        ckpt.resolve_resume(str(tmp_path / "step-000000099"), tmp_path)


def test_a_stale_temporary_folder_from_a_crashed_attempt_is_replaced(tmp_path: Path) -> None:
    stale = ckpt.prepare_tmp(tmp_path, 7)
    (stale / "leftover.bin").write_bytes(b"x")
    folder = _write(tmp_path, 7)
    assert not (folder / "leftover.bin").exists()


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _write(tmp_path, step)
    ckpt.prune(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 3]


def test_rng_round_trip() -> None:
    state = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)
    ckpt.restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])


def test_auto_resume_hashes_each_file_of_the_chosen_checkpoint_once(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write(tmp_path, 3, ranks=2)
    hashed: list[str] = []
    real = ckpt.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(ckpt, "sha256_file", counting)
    assert ckpt.resolve_resume("auto", tmp_path).step == 3
    expected = json.loads((folder / contract.CHECKPOINT_COMPLETE_MARKER).read_text())["files"]
    assert sorted(hashed) == sorted(expected)
