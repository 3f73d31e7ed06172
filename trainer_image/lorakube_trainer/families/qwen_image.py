"""Qwen-Image (QwenImagePipeline): rectified flow on a double-stream MMDiT, Qwen2.5-VL prompt features.

What differs from FLUX (flux.py), read off QwenImagePipeline and its scheduler config:
* latents: AutoencoderKLQwenImage is a video VAE; it takes and returns (B, C, F=1, H, W) and the
  pipeline normalises per channel with the config's `latents_mean`/`latents_std` (no scaling/shift
  factor). Training keeps (B, C, H, W), the frame squeezed out, like every family.
* the transformer takes the FLUX-style 2x2-packed tokens plus `img_shapes` [(frames, H/2, W/2)] per
  sample for its RoPE, and the velocity ε - x0 at timestep t/1000 = σ (no guidance embedding).
* prompts: the pipeline's system-prompt template goes through Qwen2.5-VL; the last hidden state
  minus the template's first 34 tokens (the system turn and the user header) is the embedding,
  padded to the batch's longest prompt with `encoder_hidden_states_mask` marking the padding
  (None when nothing is padded).
* σ: the scheduler config's resolution-dependent shift (μ from calculate_shift over the image-token
  count; Qwen-Image's config: 0.5 at 256 tokens, 0.9 at 8192) and its `shift_terminal` stretch,
  exactly as set_timesteps builds the 1000-step grid.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from . import recipes
from .flow import FlowFamily
from .flux import pack_latents, unpack_latents

log = logging.getLogger(__name__)

RECIPE = recipes.FlowMatchingRecipe()
# QwenImagePipeline's max_sequence_length default: prompt tokens kept after the template's.
MAX_SEQUENCE_LENGTH = 512
# Attention (both streams' q/k/v and outputs) and both streams' feed-forward in every block, the
# layers Qwen-Image LoRA trainers train; the per-block modulation (img_mod/txt_mod) stays frozen.
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
# In the last block only the image stream goes on to the output: these text-stream layers feed
# nothing the loss sees, so a LoRA on them never gets a gradient (and DDP, which expects one for
# every trainable parameter, would stall on it). They are left out wherever the targets name them.
_LAST_BLOCK_DEAD = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")


def pad_prompt(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's (B, L, D) embeddings and mask (None: nothing padded) -> fixed length `length`,
    zeros and False beyond each prompt, so conditioning of any prompt caches and collates."""
    b, n, d = embeds.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=embeds.device)
    out = embeds.new_zeros(b, length, d)
    out[:, :n] = embeds[:, :length]
    full = torch.zeros(b, length, dtype=torch.bool, device=embeds.device)
    full[:, :n] = mask[:, :length].bool()
    return out, full


def trim_prompt(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of pad_prompt for a batch: cut to the batch's longest prompt, as the pipeline pads,
    and drop the mask when no prompt is padded, as its encode_prompt does."""
    length = max(int(mask.sum(dim=1).max()), 1)
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, (None if bool(mask.all()) else mask)


def img_shapes(batch: int, height: int, width: int) -> list[list[tuple[int, int, int]]]:
    """The pipeline's `img_shapes` for (H, W) latents: one frame of (H/2) x (W/2) tokens per sample."""
    return [[(1, height // 2, width // 2)]] * batch


def latent_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE config, shaped (1, C, 1, 1, 1) in fp32 on `like`'s device."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape)
    return mean.to(like.device), std.to(like.device)


class QwenImage(FlowFamily):
    name = "qwen-image"
    denoiser_attr = "transformer"
    default_lora_targets = DEFAULT_TARGETS
    pipeline_class_name = "QwenImagePipeline"
    # ComfyUI runs Qwen-Image with diffusers' module names, so its generic `lora_unet_<path>` map
    # covers every layer (and diffusers' Qwen kohya reader takes the same names); its Qwen-Image map
    # also lists `transformer.<path>`, the diffusers file's keys.
    comfyui_prefix = "lora_unet_"
    comfyui_reads_diffusers_keys = True
    recipe = RECIPE
    t5_max_length = MAX_SEQUENCE_LENGTH
    # Real classifier-free guidance (true_cfg_scale with a negative prompt); the pipeline's
    # guidance_scale is for guidance-distilled checkpoints, which Qwen-Image is not.
    inference_guidance = 4.0

    def _inject(self, denoiser: torch.nn.Module, config: Any) -> None:
        last = len(denoiser.transformer_blocks) - 1
        dead = [f"transformer_blocks.{last}.{m}" for m in _LAST_BLOCK_DEAD]
        pattern = config.target_modules
        skipped = [m for m in dead if re.fullmatch(pattern, m)]
        live = [n for n, m in denoiser.named_modules()
                if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n) and n not in skipped]
        if not live:
            raise ValueError(
                f"--lora_target_modules names only {', '.join(skipped)}, the last block's text-stream layers, "
                f"whose output never reaches the image; name other layers too (the default is "
                f"{','.join(self.default_lora_targets)})"
            )
        if skipped:
            log.info("LoRA left off %s: the last block's text stream feeds nothing", ", ".join(skipped))
            config.exclude_modules = skipped
        super()._inject(denoiser, config)

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding (template, Qwen2.5-VL, first 34 tokens dropped), padded to
        MAX_SEQUENCE_LENGTH with its mask so the conditioning has one shape; training trims it back."""
        embeds, mask = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        embeds, mask = pad_prompt(embeds, mask, MAX_SEQUENCE_LENGTH)
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    @torch.no_grad()
    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior mean of the one-frame video, normalised with the config's per-channel mean/std,
        frame dim dropped: (B, 3, H, W) -> (B, C, H/8, W/8)."""
        vae = pipe.vae
        frames = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)
        latents = vae.encode(frames).latent_dist.mode().float()
        mean, std = latent_stats(vae, latents)
        return ((latents - mean) / std)[:, :, 0].to(self.denoiser(pipe).dtype)

    def training_loss(
        self, pipe: Any, denoiser: torch.nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        b, _, h, w = latents.shape
        dtype, device = denoiser.dtype, latents.device
        embeds, mask = trim_prompt(cond["prompt_embeds"].to(device=device, dtype=dtype),
                                   cond["prompt_mask"].to(device).bool())
        shapes = img_shapes(b, h, w)

        def predict(noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            out = denoiser(
                hidden_states=pack_latents(noisy.to(dtype)),
                timestep=sigmas,                 # the pipeline passes t/1000 = σ, in fp32
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=shapes,
                return_dict=False,
            )[0]
            return unpack_latents(out, h, w)

        return self.flow_loss(pipe, latents, predict)

    def generate_kwargs(self) -> dict[str, Any]:
        # A one-space negative prompt is what switches the pipeline's classifier-free guidance on.
        return {"true_cfg_scale": self.inference_guidance, "negative_prompt": " ",
                "max_sequence_length": MAX_SEQUENCE_LENGTH}
