"""Z-Image (ZImagePipeline): rectified flow on a single-stream DiT, one Qwen3 text encoder.

What differs from FLUX/SD3, read off ZImagePipeline.__call__:
* the transformer takes a *list* of per-sample latents shaped (C, F=1, H, W) and a list of
  caption embeddings of each prompt's own length (the padding masked out);
* it is fed t = (1000 - 1000·σ)/1000 = 1 - σ, i.e. 1 at clean data and 0 at pure noise;
* its output is the negative velocity: the pipeline steps with `-output`, so the model predicts
  x0 - ε. Negating the output and matching the flow target ε - x0 is that same objective.
* the prompt goes through the tokenizer's chat template (a user turn plus the generation
  prompt) and the embedding is the second-to-last hidden state of the text encoder.
The σ grid is the scheduler config's: resolution-dependent when `use_dynamic_shifting` is set
(calculate_shift over the 2x2-patch token count, as the pipeline passes mu), else the static shift.
"""

from __future__ import annotations

from typing import Any

import torch

from . import recipes
from .flow import FlowFamily

RECIPE = recipes.FlowMatchingRecipe()
# Attention and feed-forward of the main (joint) layers; the noise/context refiners and the adaLN
# modulation stay frozen.
DEFAULT_TARGETS = (
    "layers.*.attention.to_q", "layers.*.attention.to_k", "layers.*.attention.to_v", "layers.*.attention.to_out.0",
    "layers.*.feed_forward.w1", "layers.*.feed_forward.w2", "layers.*.feed_forward.w3",
)


def caption_list(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Padded (B, L, D) embeddings + (B, L) mask -> the per-prompt (L_i, D) list the transformer takes."""
    return [embeds[i][mask[i].bool()] for i in range(embeds.shape[0])]


class ZImage(FlowFamily):
    name = "z-image"
    denoiser_attr = "transformer"
    default_lora_targets = DEFAULT_TARGETS
    pipeline_class_name = "ZImagePipeline"
    # ComfyUI's Lumina2/Z-Image key map lists `transformer.<diffusers module path>` (and
    # `diffusion_model.`, `lycoris_`) for every diffusers module, slicing to_q/k/v into its fused qkv.
    comfyui_prefix = "lycoris_"
    comfyui_reads_diffusers_keys = True
    recipe = RECIPE
    t5_max_length = 512          # the pipeline's max_sequence_length for the Qwen3 prompt
    inference_guidance = 5.0

    @torch.no_grad()
    def encode_prompts(self, pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding, kept padded to max_sequence_length with its mask, so that
        the conditioning has a fixed shape (cacheable, collatable); caption_list drops the padding."""
        texts = [pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        tokens = pipe.tokenizer(texts, padding="max_length", max_length=self.t5_max_length, truncation=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device).bool()
        hidden = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": hidden, "prompt_mask": mask}

    def training_loss(
        self, pipe: Any, denoiser: torch.nn.Module, latents: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        dtype, device = denoiser.dtype, latents.device
        captions = caption_list(cond["prompt_embeds"].to(device=device, dtype=dtype), cond["prompt_mask"].to(device))

        def predict(noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
            frames = list(noisy.to(dtype).unsqueeze(2).unbind(0))       # (C, 1, H, W) per sample
            out = denoiser(frames, 1.0 - sigmas, captions, return_dict=False)[0]   # t = 1 - σ, fp32
            return -torch.stack(out).squeeze(2)

        return self.flow_loss(pipe, latents, predict)

    def generate_kwargs(self) -> dict[str, Any]:
        return {"guidance_scale": self.inference_guidance, "max_sequence_length": self.t5_max_length}
