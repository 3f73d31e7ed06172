"""DDPM families (Kolors, Hunyuan-DiT): per-sample integer timesteps, ε or v targets."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch

from . import recipes
from .common import PeftFamily


class DDPMFamily(PeftFamily):
    recipe: ClassVar[recipes.DDPMRecipe]
    vae_fp16_unsafe = True

    def ddpm_loss(
        self, latents: torch.Tensor, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """predict(x_t, timesteps) -> the model's ε or v prediction shaped like the latents."""
        alphas_cumprod = recipes.ddpm_alphas_cumprod(self.recipe)   # ~1000 values: cheap to recompute
        timesteps = recipes.sample_ddpm_timesteps(latents.shape[0], self.recipe, latents.device)
        noise = torch.randn_like(latents)
        noisy = recipes.ddpm_add_noise(latents, noise, alphas_cumprod, timesteps)
        target = recipes.ddpm_target(latents, noise, alphas_cumprod, timesteps, self.recipe.prediction)
        return recipes.weighted_mse(predict(noisy, timesteps), target)
