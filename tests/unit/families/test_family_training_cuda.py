"""The same family code on a CUDA device: device placement of every tensor the recipes build,
the CUDA RNG as the source of noise and timesteps, bf16 weights, fp16 Kolors VAE upcast.
Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from lorakube_trainer.families import FAMILY_NAMES, get_family

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
RANK, ALPHA = 4, 8.0


def _seeded(family, pipe, latents, cond, seed=5):
    torch.manual_seed(seed)
    return family.training_loss(pipe, family.denoiser(pipe), latents, cond)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_bf16_training_save_and_reload_on_cuda(tiny_models, example_batch, tmp_path, name):
    cuda = torch.device("cuda")
    family = get_family(name)
    pipe = family.load_pipeline(tiny_models[name], torch.bfloat16).to(cuda)
    pixels, captions = example_batch
    latents = family.encode_images(pipe, pixels.to(cuda))
    cond = family.encode_prompts(pipe, captions, cuda)
    assert latents.device.type == "cuda" and all(v.device.type == "cuda" for v in cond.values())
    denoiser = family.denoiser(pipe)
    family.add_lora(denoiser, RANK, ALPHA, list(family.default_lora_targets))
    assert not torch.backends.cuda.cudnn_sdp_enabled(), "cuDNN SDPA backward gives NaN gradients (see common.py)"
    denoiser.train()
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(3):
        loss = _seeded(family, pipe, latents, cond, seed=torch.randint(0, 1000, ()).item())
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in denoiser.parameters() if p.requires_grad]
        assert all(torch.isfinite(g).all() for g in grads), "non-finite LoRA gradients"
        optimizer.step()
        optimizer.zero_grad()
    denoiser.eval()
    with torch.no_grad():
        first, again = _seeded(family, pipe, latents, cond), _seeded(family, pipe, latents, cond)
    assert first.item() == again.item(), "same seed must give the same noise and timesteps on CUDA"

    denoiser.train()
    plain = _seeded(family, pipe, latents, cond)
    family.enable_gradient_checkpointing(denoiser)
    checkpointed = _seeded(family, pipe, latents, cond)
    assert checkpointed.item() == pytest.approx(plain.item(), rel=1e-3)
    denoiser.eval()

    path = tmp_path / "pytorch_lora_weights.safetensors"
    family.save_diffusers_lora(family.lora_state_dict(denoiser), path, RANK, ALPHA)
    fresh = family.load_pipeline(tiny_models[name], torch.bfloat16).to(cuda)
    family.load_lora_into_pipeline(fresh, path)
    with torch.no_grad():
        reloaded = _seeded(family, fresh, latents, cond)
    # bf16 LoRA on reload vs fp32 LoRA in training: equal up to bf16 rounding.
    assert reloaded.item() == pytest.approx(first.item(), rel=3e-2)
    image = family.generate(fresh, "a red circle", seed=1, height=64, width=64, steps=2)
    assert image.size == (64, 64)


def test_fp16_kolors_vae_encodes_finite_latents_on_cuda(tiny_models, example_batch):
    family = get_family("kolors")
    pipe = family.load_pipeline(tiny_models["kolors"], torch.float16).to("cuda")
    latents = family.encode_images(pipe, example_batch[0].to("cuda"))
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
    assert pipe.vae.dtype == torch.float16
