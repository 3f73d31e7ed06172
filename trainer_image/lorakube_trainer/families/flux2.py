"""FLUX.2 klein and dev: rectified flow on 2x2-patchified, batch-norm-normalised latents.

What differs from FLUX.1 (flux.py), all read off diffusers' Flux2KleinPipeline:
* latents: the VAE's 2x2 patches become channels (C -> 4C at half the size) and are normalised by the
  VAE's own batch-norm running statistics (there is no scaling/shift factor); each patch is a token.
* position ids have four axes (time, row, column, layer), text tokens (0, 0, 0, index).
* the σ shift is the pipeline's "empirical" μ, which depends on the number of image tokens and on the
  number of sampling steps; training uses the grid of the pipeline's default 50 steps.
* no guidance embedding: klein runs real classifier-free guidance at inference (the step-distilled
  klein checkpoints run none), so training feeds `guidance=None` exactly as the pipeline does.

FLUX.2 dev (Flux2Pipeline, `Flux2Dev` below) shares the transformer, VAE, packing and σ shift (the same
empirical μ at the same 50 steps); only two things differ, read off Flux2Pipeline:
* prompts: Mistral 3 (Mistral3ForConditionalGeneration) reads the prompt after the pipeline's system
  message, through the chat template of its Pixtral processor; hidden states 10, 20 and 30 are stacked.
* a guidance embedding (guidance-distilled, like FLUX.1-dev): the pipeline feeds its guidance_scale
  (4.0 by default) to it. Training feeds --guidance_scale, 1.0 unless set, as the FLUX.1 family does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorakube_api import contract

from . import lora_keys, recipes
from .flow import FlowFamily

RECIPE = recipes.FlowMatchingRecipe()
# The pipeline's default num_inference_steps: the empirical μ is taken at this step count.
SHIFT_STEPS = 50
# The Qwen3 hidden states the pipeline stacks into the prompt embedding (its default).
TEXT_LAYERS = (9, 18, 27)
# Every linear layer of the double and single blocks, as DiffSynth-Studio's FLUX.2 LoRA examples
# train them: attention of both streams, both feed-forwards, and the single blocks' fused
# q/k/v+MLP input and output. The modulation layers are shared by all blocks in FLUX.2 and stay frozen.
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out",
)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch becomes 4 channels, channel-major."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of patchify."""
    b, c4, h, w = latents.shape
    x = latents.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C): one token per position, row-major."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H·W, 4) ids (0, row, column, 0) for a packed (H, W) token grid."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=1).to(device)


def text_ids(length: int, device: torch.device) -> torch.Tensor:
    """(L, 4) ids (0, 0, 0, index) for L text tokens."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def vae_batch_norm(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's batch norm over patchified channels, shaped (1, 4C, 1, 1), fp32."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(device=like.device, dtype=torch.float32)
    var = vae.bn.running_var.view(1, -1, 1, 1).to(device=like.device, dtype=torch.float32)
    return mean, torch.sqrt(var + vae.config.batch_norm_eps)


class Flux2Klein(FlowFamily):
    name = "flux2-klein"
    denoiser_attr = "transformer"
    default_lora_targets = DEFAULT_TARGETS
    pipeline_class_name = "Flux2KleinPipeline"
    recipe = RECIPE
    t5_max_length = 512          # the pipeline's max_sequence_length (Qwen3 tokens)
    inference_guidance = 4.0     # the pipeline's default classifier-free guidance
    text_layers = TEXT_LAYERS

    def sigma_grid(self, pipe: Any, image_seq_len: int) -> torch.Tensor:
        mu = recipes.flux2_empirical_mu(image_seq_len, SHIFT_STEPS)
        return recipes.shift_sigmas_exponential(recipes.flow_base_sigmas(self.recipe.num_train_timesteps), mu)

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, _ids = pipe.encode_prompt(
            prompt=prompts, device=device, max_sequence_length=self.t5_max_length,
            text_encoder_out_layers=self.text_layers,
        )
        return {"prompt_embeds": embeds}

    @torch.no_grad()
    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior mean, normalised per patchified channel as the pipeline does, returned in the
        VAE's spatial layout (B, C, H/8, W/8) so sizes, flips and caches work as for every family."""
        vae = pipe.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode().float()
        mean, std = vae_batch_norm(vae, latents)
        normalised = (patchify(latents) - mean) / std
        return unpatchify(normalised).to(self.denoiser(pipe).dtype)

    def training_loss(
        self, pipe: Any, denoiser: torch.nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        b, _, h, w = latents.shape
        dtype, device = denoiser.dtype, latents.device
        embeds = cond["prompt_embeds"].to(device=device, dtype=dtype)
        img_ids = image_ids(h // 2, w // 2, device)
        txt_ids = text_ids(embeds.shape[1], device)
        guidance = None
        if denoiser.config.guidance_embeds:      # dev; klein's transformer has none
            guidance = torch.full((b,), self.recipe.guidance, device=device, dtype=torch.float32)

        def predict(noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            out = denoiser(
                hidden_states=pack(patchify(noisy.to(dtype))),
                timestep=sigmas,                 # the pipeline passes t/1000 = σ; the model scales it
                guidance=guidance,
                encoder_hidden_states=embeds,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            return unpatchify(unpack(out, h // 2, w // 2))

        return self.flow_loss(pipe, latents, predict)

    def to_comfyui(self, state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
        return lora_keys.to_kohya_flux2(state, alpha)


# The Mistral 3 hidden states Flux2Pipeline stacks (its default text_encoder_out_layers).
DEV_TEXT_LAYERS = (10, 20, 30)
# Training feeds the guidance embedding 1.0 by default, as this project's FLUX.1 family does and as
# DiffSynth-Studio's FLUX.2 trainer does (its `embedded_guidance`); --guidance_scale changes it (diffusers'
# FLUX.2 DreamBooth script feeds its --guidance_scale, 3.5 by default). The embedding itself is never a
# LoRA target, so it stays as trained.
DEV_RECIPE = recipes.FlowMatchingRecipe(guidance=contract.DEFAULT_TRAINING_GUIDANCE)


class Flux2Dev(Flux2Klein):
    """FLUX.2 dev: klein's recipe with Mistral 3 prompts and a guidance embedding."""

    name = "flux2-dev"
    pipeline_class_name = "Flux2Pipeline"
    recipe = DEV_RECIPE
    text_layers = DEV_TEXT_LAYERS
    inference_guidance = 4.0     # Flux2Pipeline's default guidance_scale (embedded, not classifier-free)
    diffusers_loading = (
        "`pipe.load_lora_weights(folder)` (diffusers reads the alpha from the metadata; without torchvision, "
        "load the pipeline with `tokenizer=None` and set "
        "`pipe.tokenizer = AutoTokenizer.from_pretrained(<model>/tokenizer)`)")

    def preloaded_components(self, path: Path) -> dict[str, Any]:
        return {"tokenizer": None}      # load_pipeline puts the tokenizer in

    def load_pipeline(self, model_path: str | Path, dtype: torch.dtype) -> Any:
        """The pipeline with the text half of its Pixtral processor as the tokenizer. Text-to-image uses
        only that half (the chat template and the tokenizer); the image half serves reference images and
        prompt upsampling. transformers builds a PixtralProcessor only with torchvision installed, which
        the trainer image does not carry, and diffusers accepts no plain tokenizer in its place, hence
        the tokenizer loaded apart and set on the loaded pipeline."""
        from transformers import AutoTokenizer

        pipe = super().load_pipeline(model_path, dtype)      # checks the folder; skips the tokenizer
        pipe.tokenizer = AutoTokenizer.from_pretrained(str(Path(model_path) / "tokenizer"))
        return pipe
