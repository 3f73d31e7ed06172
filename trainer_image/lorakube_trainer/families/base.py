"""What a model family must provide; the general trainer needs nothing else from it.

Each family module (flux.py, sd3.py, kolors.py, hunyuan_dit.py, flux2.py) subclasses `Family`,
keeps its recipe constants as data, and is registered in `families/__init__.py` under its contract name.
Randomness: draw noise and timesteps from torch's global RNG (on the latents' device); the
trainer seeds and checkpoints/restores that RNG, which is what makes resume bit-exact.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

import torch

log = logging.getLogger(__name__)


class Family(abc.ABC):
    name: ClassVar[str]                          # one of lorakube_api.contract.FAMILIES
    denoiser_attr: ClassVar[str]                 # "transformer" or "unet": the pipeline attribute LoRA goes into
    default_lora_targets: ClassVar[tuple[str, ...]]
    # The original framework's (DiffSynth-Studio's) module names for this family -> the diffusers
    # module names they correspond to, so that its --lora_target_modules lists keep working.
    # Targets are peft's: a module path or its last part(s); "*" stands for one path segment (a block index).
    original_target_names: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    size_multiple: ClassVar[int]                 # height/width must be multiples (contract.SIZE_MULTIPLE)
    # How a user loads the diffusers-layout file; the model card quotes it.
    diffusers_loading: ClassVar[str] = "`pipe.load_lora_weights(folder)` (diffusers reads the alpha from the metadata)"
    # Whether ComfyUI maps the diffusers-layout keys of this family's model. Where it does, it still
    # ignores the alpha (ComfyUI reads a per-module `.alpha` tensor, never the metadata).
    comfyui_reads_diffusers_keys: ClassVar[bool] = False

    @abc.abstractmethod
    def load_pipeline(self, model_path: str | Path, dtype: torch.dtype) -> Any:
        """Load the diffusers pipeline from a local folder in the real on-disk layout, frozen
        (requires_grad False, eval) in `dtype` (bf16 really loads bf16)."""

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def resolve_lora_targets(self, names: Iterable[str]) -> list[str]:
        """--lora_target_modules -> diffusers target names: the original framework's names mapped
        through `original_target_names`, any other name kept (add_lora checks it against the model)."""
        resolved: list[str] = []
        for name in names:
            mapped = self.original_target_names.get(name, (name,))
            if mapped != (name,):
                log.info("--lora_target_modules: %s (the original framework's name) -> %s", name, ",".join(mapped))
            for target in mapped:
                if target not in resolved:
                    resolved.append(target)
        return resolved

    @abc.abstractmethod
    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of prompts, as a dict of tensors with batch dim first
        (so it can be cached to disk and collated)."""

    @abc.abstractmethod
    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """pixels in [-1, 1], (B, 3, H, W) -> scaled/shifted latents as the denoiser expects them."""

    @abc.abstractmethod
    def training_loss(
        self, pipe: Any, denoiser: torch.nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Scalar loss for one batch: one timestep per sample, the family's objective and
        loss weighting, computed in fp32. The timestep reaches the denoiser as sampled, in fp32
        (or as integers): cast to bf16 it would move (997.5 -> 996), and the model would learn to
        denoise one noise level under the time embedding of another."""

    @abc.abstractmethod
    def add_lora(self, denoiser: torch.nn.Module, rank: int, alpha: float, targets: list[str],
                 dropout: float = 0.0) -> None:
        """Inject LoRA layers (peft) into the denoiser; only they require grad afterwards. `dropout`
        applies to the LoRA branch's input while training (--lora_dropout)."""

    @abc.abstractmethod
    def read_diffusers_lora(self, path: Path) -> tuple[dict[str, torch.Tensor], int, float]:
        """A LoRA file this family wrote (save_diffusers_lora) -> (state as lora_state_dict keys it,
        rank, alpha); ValueError naming what does not fit when the file is not such a LoRA."""

    def set_training_guidance(self, scale: float, denoiser: torch.nn.Module) -> None:
        """--guidance_scale: the value training feeds the denoiser's guidance embedding from now on.
        ValueError, saying why, where the family or this loaded denoiser has no such embedding."""
        raise ValueError(f"{self.name} has no guidance embedding to feed")

    @abc.abstractmethod
    def enable_gradient_checkpointing(self, denoiser: torch.nn.Module) -> None: ...

    @abc.abstractmethod
    def lora_state_dict(self, denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The LoRA tensors in diffusers/peft layout (the keys load_lora_weights accepts)."""

    @abc.abstractmethod
    def set_lora_state_dict(self, denoiser: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Inverse of lora_state_dict, used by checkpoint resume."""

    @abc.abstractmethod
    def save_diffusers_lora(self, state: dict[str, torch.Tensor], path: Path, rank: int, alpha: float) -> None:
        """Write one .safetensors loadable by the family's diffusers pipeline (or peft where
        diffusers has no loader), with alpha stored in its metadata."""

    @abc.abstractmethod
    def to_comfyui(self, state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
        """kohya/ComfyUI key layout (lora_down/lora_up + a per-module `alpha` scalar)."""

    @abc.abstractmethod
    def load_lora_into_pipeline(self, pipe: Any, path: Path) -> None:
        """Load a file written by save_diffusers_lora into a fresh pipeline (the post-save check)."""

    @abc.abstractmethod
    def generate(self, pipe: Any, prompt: str, seed: int, height: int, width: int, steps: int) -> Any:
        """One PIL image for validation grids (same seed -> same noise)."""
