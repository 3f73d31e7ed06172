"""The denoiser receives the timestep that was sampled, exactly, whatever the weights' dtype: the
pipelines pass it in fp32 (or as integers), and bf16 would move it (997.5 -> 996, 997 -> 996)."""

from __future__ import annotations

import pytest
import torch

from lorakube_trainer.families import FAMILY_NAMES, get_family, recipes
from lorakube_trainer.families.flow import FlowFamily

CPU = torch.device("cpu")
SIGMA = 0.9975            # 997.5 on SD3's 0..1000 scale: not representable in bf16
DDPM_STEP = 997           # bf16 holds integers above 512 only in steps of 4


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_denoiser_gets_the_sampled_timestep_unrounded_under_bf16_weights(tiny_models, example_batch, name,
                                                                        monkeypatch):
    family = get_family(name)
    pipe = family.load_pipeline(tiny_models[name], torch.bfloat16)
    pixels, captions = example_batch
    latents, cond = family.encode_images(pipe, pixels), family.encode_prompts(pipe, captions, CPU)
    denoiser = family.denoiser(pipe)
    family.add_lora(denoiser, 4, 4.0, list(family.default_lora_targets))
    batch = latents.shape[0]
    if isinstance(family, FlowFamily):
        monkeypatch.setattr(recipes, "sample_flow_sigmas",
                            lambda grid, n, recipe, device: torch.full((n,), SIGMA, device=device))
        # FLUX and Qwen-Image take σ (the model multiplies by 1000 itself), SD3 takes 1000·σ, Z-Image 1 - σ.
        expected = torch.full((batch,), SIGMA) * (1000 if name == "sd3" else 1)
        if name == "z-image":
            expected = 1.0 - torch.full((batch,), SIGMA)
    else:
        monkeypatch.setattr(recipes, "sample_ddpm_timesteps",
                            lambda n, recipe, device: torch.full((n,), DDPM_STEP, device=device))
        expected = torch.full((batch,), float(DDPM_STEP))
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["timestep"] if "timestep" in kwargs else args[1])

    denoiser.register_forward_pre_hook(record, with_kwargs=True)
    loss = family.training_loss(pipe, denoiser, latents, cond)
    loss.backward()
    (timestep,) = seen
    assert timestep.dtype in (torch.float32, torch.int64), timestep.dtype
    assert torch.equal(timestep.float(), expected), (timestep, expected)
    assert torch.isfinite(loss)
