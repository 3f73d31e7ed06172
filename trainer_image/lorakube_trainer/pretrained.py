"""Starting from an existing LoRA (--pretrained_lora_path, the original trainer's flag).

The LoRA is one this trainer wrote in the diffusers layout: a .safetensors file or an output folder
holding it (an earlier run's output, so a job can continue where another one ended). Its rank,
alpha and target modules must be those of this run: a LoRA of another shape cannot be continued,
and silently training a fresh one instead would waste the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorakube_api import contract

from .config import ConfigError, TrainConfig
from .families.base import Family

log = logging.getLogger(__name__)
FLAG = contract.FLAG_PRETRAINED_LORA_PATH


def lora_file(path: str | Path) -> Path:
    """The LoRA file a --pretrained_lora_path value names: the file, or the diffusers LoRA in a folder."""
    given = Path(path)
    found = given / contract.ARTIFACT_LORA_DIFFUSERS if given.is_dir() else given
    if not found.is_file():
        where = f"{given} holds no {contract.ARTIFACT_LORA_DIFFUSERS}" if given.is_dir() else f"{given} does not exist"
        raise ConfigError(FLAG, f"{where}; give a diffusers-format LoRA file or a lorakube output folder")
    return found


def start_from_lora(family: Family, denoiser: torch.nn.Module, cfg: TrainConfig) -> None:
    """Load the pretrained LoRA's weights into the freshly added adapters of `denoiser`."""
    assert cfg.pretrained_lora_path is not None
    path = lora_file(cfg.pretrained_lora_path)
    try:
        state, rank, alpha = family.read_diffusers_lora(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(FLAG, f"{path} is not a {family.name} LoRA in the diffusers layout: {exc}") from exc
    flags = contract.TRAINING_FLAGS
    if rank != cfg.lora_rank:
        raise ConfigError(FLAG, f"{path} has rank {rank} but {flags['loraRank']} is {cfg.lora_rank}; "
                                f"set {flags['loraRank']} {rank}")
    if alpha != cfg.lora_alpha:
        raise ConfigError(FLAG, f"{path} has alpha {alpha:g} but {flags['loraAlpha']} is {cfg.lora_alpha:g}; "
                                f"set {flags['loraAlpha']} {alpha:g}")
    try:
        family.set_lora_state_dict(denoiser, state)
    except ValueError as exc:
        raise ConfigError(FLAG, f"{path} does not fit the {flags['loraTargetModules']} of this run: {exc}") from exc
    log.info("starting from the LoRA in %s (rank %d, alpha %g)", path, rank, alpha)
