"""Stable Diffusion 3 / 3.5: rectified flow (MMDiT), two CLIPs + T5, static shift from the scheduler."""

from __future__ import annotations

from typing import Any

import torch

from . import recipes
from .flow import MMDIT_ORIGINAL_TARGETS, FlowFamily

RECIPE = recipes.FlowMatchingRecipe()
# DiffSynth-Studio's SD3 DiT fuses q/k/v; diffusers keeps them apart. Its `a` stream is the image
# (attn, and attn2 in SD3.5's dual-attention blocks), `b` the text.
ORIGINAL_TARGETS = {
    "a_to_qkv": ("to_q", "to_k", "to_v"),
    **MMDIT_ORIGINAL_TARGETS,
    # The original's SD3 default list spells the adaLN layers this way, which matched no layer of
    # its model; here they mean the layers they name.
    "norm_1_a.linear": ("norm1.linear",),
    "norm_1_b.linear": ("norm1_context.linear",),
}
# What the original's default really trained: attention and feed-forward of both streams (its
# norm_1_* entries matched nothing, so the adaLN layers stayed frozen).
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


class SD3(FlowFamily):
    name = "sd3"
    denoiser_attr = "transformer"
    default_lora_targets = DEFAULT_TARGETS
    original_target_names = ORIGINAL_TARGETS
    pipeline_class_name = "StableDiffusion3Pipeline"
    comfyui_prefix = "lora_transformer_"
    comfyui_reads_diffusers_keys = True
    recipe = RECIPE
    t5_max_length = 77
    inference_guidance = 5.0

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, _neg, pooled, _neg_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=device,
            do_classifier_free_guidance=False, max_sequence_length=self.t5_max_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def training_loss(
        self, pipe: Any, denoiser: torch.nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        dtype, device = denoiser.dtype, latents.device

        def predict(noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            return denoiser(
                hidden_states=noisy.to(dtype),
                timestep=sigmas * self.recipe.num_train_timesteps,     # fp32, as the pipeline passes it
                encoder_hidden_states=cond["prompt_embeds"].to(device=device, dtype=dtype),
                pooled_projections=cond["pooled_prompt_embeds"].to(device=device, dtype=dtype),
                return_dict=False,
            )[0]

        return self.flow_loss(pipe, latents, predict)
