"""FLUX.1: rectified flow on 2x2-packed latents, guidance embedding fed --guidance_scale (1.0) while training."""

from __future__ import annotations

from typing import Any

import torch

from lorakube_api import contract

from . import recipes
from .flow import MMDIT_ORIGINAL_TARGETS, FlowFamily

RECIPE = recipes.FlowMatchingRecipe(guidance=contract.DEFAULT_TRAINING_GUIDANCE)
# DiffSynth-Studio's FLUX DiT fuses q/k/v (and, in single blocks, the MLP input) into one linear layer;
# diffusers keeps them apart, so a fused name maps to each part. Its double blocks are `blocks`, its
# single blocks `single_blocks`, and its proj_out and norm.linear exist only in single blocks (the
# last layers are final_proj_out / final_norm_out), hence the "*" patterns that leave out diffusers'
# top-level proj_out and the double blocks' attention.
ORIGINAL_TARGETS = {
    "a_to_qkv": ("transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k", "transformer_blocks.*.attn.to_v"),
    **MMDIT_ORIGINAL_TARGETS,
    "to_qkv_mlp": ("single_transformer_blocks.*.attn.to_q", "single_transformer_blocks.*.attn.to_k",
                   "single_transformer_blocks.*.attn.to_v", "proj_mlp"),
    "proj_out": ("single_transformer_blocks.*.proj_out",),
    "norm.linear": ("norm.linear",),
}
# The original's default: every linear layer of the double and single blocks (attention, feed-forward,
# adaLN modulation), which is ORIGINAL_TARGETS as a whole, named the diffusers way.
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear",
    "proj_mlp", "single_transformer_blocks.*.proj_out", "norm.linear",
)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): each 2x2 patch becomes one token, channel-major inside."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent of (height, width)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2·W/2, 3) position ids: (0, row, column) per packed token, the RoPE axes FLUX expects."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Flux(FlowFamily):
    name = "flux"
    denoiser_attr = "transformer"
    default_lora_targets = DEFAULT_TARGETS
    original_target_names = ORIGINAL_TARGETS
    pipeline_class_name = "FluxPipeline"
    comfyui_prefix = "lora_transformer_"
    comfyui_reads_diffusers_keys = True
    recipe = RECIPE
    t5_max_length = 512
    inference_guidance = 3.5

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=device, max_sequence_length=self.t5_max_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def training_loss(
        self, pipe: Any, denoiser: torch.nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        b, _, h, w = latents.shape
        dtype, device = denoiser.dtype, latents.device
        embeds = cond["prompt_embeds"].to(device=device, dtype=dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        img_ids = latent_image_ids(h, w, device, dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.recipe.guidance, device=device, dtype=torch.float32)

        def predict(noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            out = denoiser(
                hidden_states=pack_latents(noisy.to(dtype)),
                timestep=sigmas,                    # FLUX takes t/1000 = σ; fp32, the model casts it itself
                guidance=guidance,
                pooled_projections=cond["pooled_prompt_embeds"].to(device=device, dtype=dtype),
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            return unpack_latents(out, h, w)

        return self.flow_loss(pipe, latents, predict)
