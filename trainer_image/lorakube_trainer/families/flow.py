"""Rectified-flow families (FLUX, SD3): the shared noising, σ sampling and loss."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from . import recipes
from .common import PeftFamily


class FlowFamily(PeftFamily):
    recipe: ClassVar[recipes.FlowMatchingRecipe]
    # T5 token length used for prompts (a recipe constant: FLUX 512, SD3 77).
    t5_max_length: ClassVar[int]

    def sigma_grid(self, pipe: Any, image_seq_len: int) -> torch.Tensor:
        return recipes.shifted_sigma_grid(pipe.scheduler.config, image_seq_len, self.recipe.num_train_timesteps)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Number of image tokens the denoiser sees (2x2 latent patches for both families)."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def flow_loss(
        self, pipe: Any, latents: torch.Tensor, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """predict(x_t, sigmas) -> velocity prediction shaped like the latents."""
        batch = latents.shape[0]
        grid = self.sigma_grid(pipe, self.image_seq_len(latents))
        sigmas = recipes.sample_flow_sigmas(grid, batch, self.recipe, latents.device)
        noise = torch.randn_like(latents)
        noisy = recipes.flow_interpolate(latents, noise, sigmas)
        pred = predict(noisy, sigmas)
        weights = recipes.flow_loss_weights(sigmas, self.recipe)
        return recipes.weighted_mse(pred, recipes.flow_target(latents, noise), weights)

    def generate_kwargs(self) -> dict[str, Any]:
        return {**super().generate_kwargs(), "max_sequence_length": self.t5_max_length}
