"""Hunyuan-DiT: DiT with BERT (CLIP-zh) + mT5 conditioning, DDPM v-prediction, β 0.00085 -> 0.03.

diffusers has no LoRA loader for it (HunyuanDiT2DModel lacks PeftAdapterMixin), so LoRA goes in
through `peft.inject_adapter_in_model`, and the saved diffusers-layout file is loaded by
`load_lora_into_pipeline` (or by hand: LoraConfig(**json.loads(metadata["lora_adapter_metadata"]))
with the "transformer." prefix stripped from its keys, inject_adapter_in_model, then
set_peft_model_state_dict with the tensors' "transformer." prefix stripped).
The VAE is SDXL's, so fp16 encoding runs the VAE in fp32 (see kolors.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

from . import lora_keys, recipes
from .common import latent_pixel_size
from .ddpm import DDPMFamily

RECIPE = recipes.DDPMRecipe(prediction="v_prediction", beta_start=0.00085, beta_end=0.03, num_train_timesteps=1000)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # attn1 (self) and attn2 (cross) of every block
# As in kolors.py: the original's attention output projection to_out is diffusers' to_out.0.
ORIGINAL_TARGETS = {"to_out": ("to_out.0",)}
_CHECKPOINTED = "_lorakube_checkpointed"
_FP32_TIMESTEPS = "_lorakube_fp32_timesteps"


def _embed_in_weight_dtype(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """HunyuanDiT2DModel runs its timestep/size embedding in `timestep.dtype` (its pipeline passes
    the timestep in the latents' dtype, so bf16 rounds it). Training passes fp32 timesteps, so the
    embedding's dtype is pinned to the weights' here: sinusoids from the exact time, then the MLP in
    the weights' dtype, as diffusers' other denoisers do."""
    return args, {**kwargs, "hidden_dtype": module.timestep_embedder.linear_1.weight.dtype}


def rotary_embedding(denoiser: torch.nn.Module, latent_h: int, latent_w: int, device: torch.device) -> tuple:
    """2-D RoPE for this resolution, exactly as HunyuanDiTPipeline builds it (base size 512 px)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    patch = denoiser.config.patch_size
    grid_h, grid_w = latent_h // patch, latent_w // patch
    base = 512 // 8 // patch
    crops = get_resize_crop_region_for_grid((grid_h, grid_w), base)
    return get_2d_rotary_pos_embed(
        denoiser.inner_dim // denoiser.num_heads, crops, (grid_h, grid_w), device=device, output_type="pt"
    )


class HunyuanDiT(DDPMFamily):
    name = "hunyuan-dit"
    denoiser_attr = "transformer"
    default_lora_targets = DEFAULT_TARGETS
    original_target_names = ORIGINAL_TARGETS
    pipeline_class_name = "HunyuanDiTPipeline"
    diffusers_loading = (
        "diffusers has no LoRA loader for Hunyuan-DiT: build `peft.LoraConfig(**config)` from the JSON in the "
        "`lora_adapter_metadata` metadata (keys without `transformer.`), `inject_adapter_in_model(config, "
        "pipe.transformer)`, then `set_peft_model_state_dict` with the tensors' `transformer.` prefix stripped"
    )
    recipe = RECIPE
    max_length_clip = 77
    max_length_t5 = 256
    inference_guidance = 5.0

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for index, (suffix, length) in enumerate((("", self.max_length_clip), ("_2", self.max_length_t5))):
            embeds, _neg, mask, _neg_mask = pipe.encode_prompt(
                prompt=prompts, device=device, do_classifier_free_guidance=False,
                max_sequence_length=length, text_encoder_index=index,
            )
            out[f"prompt_embeds{suffix}"] = embeds
            out[f"prompt_attention_mask{suffix}"] = mask
        return out

    def training_loss(
        self, pipe: Any, denoiser: torch.nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        dtype, device = denoiser.dtype, latents.device
        b = latents.shape[0]
        height, width = latent_pixel_size(pipe, latents)
        # image_meta_size = original size + target size + crop top-left.
        meta = torch.tensor([height, width, height, width, 0, 0], device=device, dtype=dtype).repeat(b, 1)
        style = torch.zeros(b, device=device, dtype=torch.long)
        rope = rotary_embedding(denoiser, latents.shape[-2], latents.shape[-1], device)

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            out = denoiser(
                noisy.to(dtype),
                # fp32: exact integers (bf16 rounds 997 to 996); see _embed_in_weight_dtype.
                timestep=timesteps.float(),
                encoder_hidden_states=cond["prompt_embeds"].to(device=device, dtype=dtype),
                text_embedding_mask=cond["prompt_attention_mask"].to(device),
                encoder_hidden_states_t5=cond["prompt_embeds_2"].to(device=device, dtype=dtype),
                text_embedding_mask_t5=cond["prompt_attention_mask_2"].to(device),
                image_meta_size=meta, style=style, image_rotary_emb=rope, return_dict=False,
            )[0]
            # learn_sigma: the channels are [prediction, variance]; train the prediction only.
            return out.chunk(2, dim=1)[0]

        return self.ddpm_loss(latents, predict)

    def _inject(self, denoiser: torch.nn.Module, config: Any) -> None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, denoiser)
        # This denoiser is about to train, and training_loss passes fp32 timesteps.
        if not getattr(denoiser, _FP32_TIMESTEPS, False):
            denoiser.time_extra_emb.register_forward_pre_hook(_embed_in_weight_dtype, with_kwargs=True)
            setattr(denoiser, _FP32_TIMESTEPS, True)

    def enable_gradient_checkpointing(self, denoiser: torch.nn.Module) -> None:
        """HunyuanDiT2DModel refuses diffusers' switch, so each block's forward is wrapped in
        torch.utils.checkpoint here. Wrapping `forward` (not the module) keeps the module tree, so
        peft still finds its LoRA layers; torch's checkpoint_wrapper breaks get_peft_model_state_dict."""
        for block in denoiser.blocks:
            if getattr(block, _CHECKPOINTED, False):
                continue
            inner = block.forward

            def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                if torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)

            block.forward = forward
            setattr(block, _CHECKPOINTED, True)

    def to_comfyui(self, state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
        return lora_keys.to_comfyui_hunyuan(state, alpha)

    def load_lora_into_pipeline(self, pipe: Any, path: Path) -> None:
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        tensors, metadata = lora_keys.load_safetensors(Path(path))
        state, config = lora_keys.from_diffusers_layout(tensors, metadata, self.denoiser_attr)
        denoiser = self.denoiser(pipe)
        inject_adapter_in_model(LoraConfig(**config), denoiser)
        result = set_peft_model_state_dict(denoiser, state)
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        if unexpected:
            raise ValueError(f"{path}: LoRA keys that fit no module of this model, e.g. {unexpected[0]}")

    def generate_kwargs(self) -> dict[str, Any]:
        # Keep the requested size: the pipeline otherwise snaps it to its trained aspect buckets.
        return {**super().generate_kwargs(), "use_resolution_binning": False}
