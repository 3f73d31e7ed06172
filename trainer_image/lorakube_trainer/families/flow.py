"""Rectified-flow families (FLUX, SD3): the shared noising, σ sampling and loss."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch

from . import recipes
from .common import PeftFamily

# The original framework's names for the layers FLUX's and SD3's double-stream (MMDiT) blocks share,
# `a` the image stream and `b` the text stream, as diffusers names them. Each family adds the names
# that differ (the fused q/k/v of the image stream, FLUX's single blocks, SD3's misspelt defaults).
MMDIT_ORIGINAL_TARGETS: dict[str, tuple[str, ...]] = {
    "b_to_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "a_to_out": ("to_out.0",),
    "b_to_out": ("to_add_out",),
    "ff_a.0": ("ff.net.0.proj",),
    "ff_a.2": ("ff.net.2",),
    "ff_b.0": ("ff_context.net.0.proj",),
    "ff_b.2": ("ff_context.net.2",),
    "norm1_a.linear": ("norm1.linear",),
    "norm1_b.linear": ("norm1_context.linear",),
}


class FlowFamily(PeftFamily):
    recipe: recipes.FlowMatchingRecipe          # a class constant; set_training_guidance overrides it per object
    # T5 token length used for prompts (a recipe constant: FLUX 512, SD3 77).
    t5_max_length: ClassVar[int]

    def set_training_guidance(self, scale: float, denoiser: torch.nn.Module) -> None:
        if self.recipe.guidance is None:
            super().set_training_guidance(scale, denoiser)
        # A checkpoint of a guidance family may still lack the embedding (FLUX.1-schnell is not
        # guidance-distilled): training then feeds nothing, so any value but the default is refused.
        if not getattr(denoiser.config, "guidance_embeds", False) and scale != self.recipe.guidance:
            raise ValueError(f"this {self.name} transformer has no guidance embedding (guidance_embeds is false "
                             f"in its config, as for FLUX.1-schnell), so {scale:g} would reach nothing; drop it")
        # An instance attribute: the class's recipe, and every other family object, stay as they are.
        self.recipe = dataclasses.replace(self.recipe, guidance=scale)

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
