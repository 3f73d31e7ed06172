"""Kolors: SDXL-architecture UNet conditioned on ChatGLM3, DDPM ε-prediction, β 0.00085 -> 0.014
over 1100 steps.

fp16 note: Kolors ships SDXL's VAE, which overflows in fp16 (its config sets force_upcast). When the
pipeline is loaded in fp16, `encode_images` runs the VAE in fp32 and casts it back, and the
pipeline's own decode upcasts the same way; bf16 has the range and needs nothing. An fp16-fix VAE
(madebyollin/sdxl-vae-fp16-fix) can replace `vae/` in the model folder to avoid the upcast.
"""

from __future__ import annotations

from typing import Any

import torch

from . import recipes
from .common import latent_pixel_size
from .ddpm import DDPMFamily

RECIPE = recipes.DDPMRecipe(prediction="epsilon", beta_start=0.00085, beta_end=0.014, num_train_timesteps=1100)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # self- and cross-attention of every transformer block
# The original's UNet names its attention output projection to_out (a linear layer); diffusers' to_out
# is a list whose linear layer is to_out.0. to_q/to_k/to_v are the same in both.
ORIGINAL_TARGETS = {"to_out": ("to_out.0",)}


class Kolors(DDPMFamily):
    name = "kolors"
    denoiser_attr = "unet"
    default_lora_targets = DEFAULT_TARGETS
    original_target_names = ORIGINAL_TARGETS
    pipeline_class_name = "KolorsPipeline"
    comfyui_prefix = "lora_unet_"
    recipe = RECIPE
    max_sequence_length = 256
    inference_guidance = 5.0

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, _neg, pooled, _neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def training_loss(
        self, pipe: Any, denoiser: torch.nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        dtype, device = denoiser.dtype, latents.device
        height, width = latent_pixel_size(pipe, latents)
        # SDXL micro-conditioning: original size, crop top-left, target size (images are resized
        # and cropped to exactly height x width before encoding).
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
        added = {
            "text_embeds": cond["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            "time_ids": time_ids.repeat(latents.shape[0], 1),
        }

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return denoiser(
                noisy.to(dtype), timesteps,
                encoder_hidden_states=cond["prompt_embeds"].to(device=device, dtype=dtype),
                added_cond_kwargs=added, return_dict=False,
            )[0]

        return self.ddpm_loss(latents, predict)
