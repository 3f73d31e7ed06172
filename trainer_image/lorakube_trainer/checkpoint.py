"""Atomic, resumable checkpoints in the contract's layout.

    <checkpoint_dir>/step-000000120/trainable.safetensors   LoRA tensors (written by rank 0)
    <checkpoint_dir>/step-000000120/ema.safetensors         --ema_decay only: the LoRA's moving average (rank 0)
    <checkpoint_dir>/step-000000120/state.pt                optimizer, step, epoch, data position (rank 0)
    <checkpoint_dir>/step-000000120/rng-rank-00001.pt       each rank's RNG states (written by that rank)
    <checkpoint_dir>/step-000000120/optimizer-rank-00001.pt DeepSpeed only: that rank's ZeRO optimizer partition
    <checkpoint_dir>/step-000000120/COMPLETE.json           written last by rank 0: step + sha256 per file

Everything is written into `.tmp-step-...` first and renamed when COMPLETE.json is in place, so a
reader either sees a whole checkpoint or none; a folder without a valid marker is never resumed from.
This module holds the pure file logic; callbacks.py decides when to call it during training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from lorakube_api import contract

from .config import RESUME_AUTO, RESUME_NEVER
from .files import atomic_write_bytes, save_safetensors, sha256_file  # noqa: F401 (re-exported)

TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint named with --resume PATH is missing, incomplete or corrupt."""


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank:05d}.pt"


def optimizer_file(rank: int) -> str:
    """Per-rank optimizer state: DeepSpeed ZeRO partitions the optimizer across ranks."""
    return f"optimizer-rank-{rank:05d}.pt"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f"{TMP_PREFIX}{contract.checkpoint_dir_name(step)}"


def prepare_tmp(root: Path, step: int) -> Path:
    """Rank 0: a clean temporary folder (a crashed earlier attempt may have left one behind)."""
    tmp = tmp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_trainable(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Cloned: under DeepSpeed the parameters are views of one flat buffer, and safetensors refuses
    # tensors that share memory.
    save_safetensors({k: v.detach().to("cpu").clone() for k, v in tensors.items()}, tmp / TRAINABLE_FILE)


def write_ema(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_safetensors({k: v.detach().to("cpu").clone() for k, v in tensors.items()}, tmp / EMA_FILE)


def write_state(tmp: Path, state: dict[str, Any]) -> None:
    torch.save(state, tmp / STATE_FILE)


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rng(tmp: Path, rank: int) -> None:
    torch.save(capture_rng(), tmp / rng_file(rank))


def write_rank_optimizer(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    torch.save(state, tmp / optimizer_file(rank))


def finalize(root: Path, step: int) -> Path:
    """Rank 0, after every rank wrote its files: hash them, write the marker, publish by rename."""
    tmp = tmp_dir(root, step)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    for required in (TRAINABLE_FILE, STATE_FILE):
        if required not in files:
            raise CheckpointError(f"checkpoint {tmp} lacks {required}")
    marker = {"step": step, "files": files}
    atomic_write_bytes(tmp / contract.CHECKPOINT_COMPLETE_MARKER, json.dumps(marker, indent=2).encode())
    final = root / contract.checkpoint_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The parsed COMPLETE.json if the folder is a whole, uncorrupted checkpoint, else None."""
    try:
        marker = json.loads((folder / contract.CHECKPOINT_COMPLETE_MARKER).read_text())
        files = marker["files"]
        int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            return None
    return marker


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every published folder name, newest first (complete or not)."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            name = child.name
            if child.is_dir() and name.startswith(contract.CHECKPOINT_DIR_PREFIX):
                suffix = name[len(contract.CHECKPOINT_DIR_PREFIX):]
                if suffix.isdigit():
                    found.append((int(suffix), child))
    return sorted(found, reverse=True)


def _latest_complete(root: Path) -> tuple[Path, dict[str, Any]] | None:
    for _, folder in list_checkpoints(root):
        marker = read_marker(folder)
        if marker is not None:
            return folder, marker
    return None


def find_latest_complete(root: Path) -> Path | None:
    latest = _latest_complete(root)
    return None if latest is None else latest[0]


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (incomplete ones are left for inspection)."""
    complete = [folder for _, folder in list_checkpoints(root)
                if (folder / contract.CHECKPOINT_COMPLETE_MARKER).exists()]
    for folder in complete[keep:]:
        shutil.rmtree(folder, ignore_errors=True)


@dataclasses.dataclass
class LoadedCheckpoint:
    folder: Path
    step: int
    trainable: dict[str, torch.Tensor]
    state: dict[str, Any]

    def ema(self) -> dict[str, torch.Tensor] | None:
        """The LoRA's moving average saved with this step, if the run kept one (--ema_decay)."""
        path = self.folder / EMA_FILE
        return load_file(str(path)) if path.is_file() else None

    def rng_for(self, rank: int) -> dict[str, Any] | None:
        return self._rank_file(rng_file(rank))

    def optimizer_for(self, rank: int) -> dict[str, Any] | None:
        return self._rank_file(optimizer_file(rank))

    def _rank_file(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        return torch.load(path, weights_only=False) if path.is_file() else None


def load(folder: Path) -> LoadedCheckpoint:
    marker = read_marker(folder)
    if marker is None:
        raise CheckpointError(f"{folder} is not a complete checkpoint (no valid {contract.CHECKPOINT_COMPLETE_MARKER} "
                              "or a file does not match its sha256); pick another or use --resume auto")
    return _load_verified(folder, marker)


def _load_verified(folder: Path, marker: dict[str, Any]) -> LoadedCheckpoint:
    # Our own files, written by this trainer: the pickle in state.pt holds optimizer state and RNG tuples.
    state = torch.load(folder / STATE_FILE, weights_only=False)
    return LoadedCheckpoint(folder=folder, step=int(marker["step"]), trainable=load_file(str(folder / TRAINABLE_FILE)),
                            state=state)


def resolve_resume(resume: str, root: Path) -> LoadedCheckpoint | None:
    """--resume auto|never|PATH -> the checkpoint to continue from, if any."""
    if resume == RESUME_NEVER:
        return None
    if resume == RESUME_AUTO:
        # read_marker already hashed every file of the chosen folder: load it without hashing again.
        latest = _latest_complete(root)
        return None if latest is None else _load_verified(*latest)
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointError(f"--resume: {resume} is not a folder; give a step-NNNNNNNNN checkpoint folder, "
                              "auto or never")
    return load(folder)
