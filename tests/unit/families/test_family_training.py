"""Per family: a few hand-rolled AdamW steps on the tiny model and the example images at 64 px,
then the saved LoRA files checked the way a user would check them."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorakube_trainer.families import FAMILY_NAMES, Family, get_family, lora_keys
from lorakube_trainer.families.common import unmatched_targets
from lorakube_trainer.files import save_safetensors

RANK, ALPHA = 4, 8.0          # alpha != rank, so a loader that ignores alpha gets a different scale
STEPS, LR = 4, 5e-3
CPU = torch.device("cpu")

# The one LoRA tensor that legitimately gets no gradient: SD3's last block is context_pre_only,
# so its text-query projection feeds nothing.
FROZEN_BY_ARCHITECTURE = {"sd3": {"transformer_blocks.1.attn.add_q_proj.lora_B.weight"}}
# One module per family whose ComfyUI name and alpha are checked literally.
COMFYUI_EXAMPLE = {
    "flux": ("transformer_blocks.0.attn.to_q", "lora_transformer_transformer_blocks_0_attn_to_q", ALPHA),
    "sd3": ("transformer_blocks.0.attn.add_k_proj", "lora_transformer_transformer_blocks_0_attn_add_k_proj", ALPHA),
    "kolors": (
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
        "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v",
        ALPHA,
    ),
    "hunyuan-dit": ("blocks.1.attn1.to_k", "base_model.model.blocks.1.attn1.Wqkv", ALPHA),
    "z-image": ("layers.1.feed_forward.w3", "lycoris_layers_1_feed_forward_w3", ALPHA),
    "flux2-klein": ("transformer_blocks.0.attn.to_k", "lora_unet_double_blocks_0_img_attn_qkv", ALPHA),
    "qwen-image": ("transformer_blocks.1.img_mlp.net.2", "lora_unet_transformer_blocks_1_img_mlp_net_2", ALPHA),
    "flux2-dev": ("transformer_blocks.0.attn.to_k", "lora_unet_double_blocks_0_img_attn_qkv", ALPHA),
}
# Families whose ComfyUI layout fuses q/k/v into one layer: the example module's fused parts, in order.
COMFYUI_FUSED = {
    "hunyuan-dit": [f"blocks.1.attn1.{m}" for m in ("to_q", "to_k", "to_v")],
    "flux2-klein": [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")],
    "flux2-dev": [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")],
}


@dataclasses.dataclass
class Trained:
    family: Family
    pipe: Any
    latents: torch.Tensor
    cond: dict[str, torch.Tensor]
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    losses: list[float]
    # The loss on the fixed batch with fixed noise and timesteps (seeded_loss), before and after training.
    fixed_before: float
    fixed_after: float
    lora_file: Path
    seconds: float


def seeded_loss(family: Family, pipe: Any, latents: torch.Tensor, cond: dict, seed: int = 123) -> torch.Tensor:
    torch.manual_seed(seed)
    return family.training_loss(pipe, family.denoiser(pipe), latents, cond)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def trained(request, tiny_models, example_batch, tmp_path_factory) -> Trained:
    name = request.param
    family = get_family(name)
    start = time.perf_counter()
    pipe = family.load_pipeline(tiny_models[name], torch.float32)
    pixels, captions = example_batch
    latents = family.encode_images(pipe, pixels)
    cond = family.encode_prompts(pipe, captions, CPU)
    denoiser = family.denoiser(pipe)
    family.add_lora(denoiser, RANK, ALPHA, list(family.default_lora_targets))
    before = {k: v.clone() for k, v in family.lora_state_dict(denoiser).items()}
    with torch.no_grad():
        fixed_before = seeded_loss(family, pipe, latents, cond).item()
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=LR)
    denoiser.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(STEPS):
        loss = family.training_loss(pipe, denoiser, latents, cond)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    denoiser.eval()
    with torch.no_grad():
        fixed_after = seeded_loss(family, pipe, latents, cond).item()
    after = family.lora_state_dict(denoiser)
    lora_file = tmp_path_factory.mktemp(name) / "pytorch_lora_weights.safetensors"
    family.save_diffusers_lora(after, lora_file, RANK, ALPHA)
    return Trained(family, pipe, latents, cond, before, after, losses, fixed_before, fixed_after, lora_file,
                   time.perf_counter() - start)


def test_training_gives_finite_fp32_losses_and_moves_lora_b(trained):
    assert all(np.isfinite(trained.losses)), trained.losses
    b_keys = {k for k in trained.after if ".lora_B." in k}
    assert b_keys
    unchanged = {k for k in b_keys if torch.equal(trained.before[k], trained.after[k])}
    assert unchanged == FROZEN_BY_ARCHITECTURE.get(trained.family.name, set())
    print(f"{trained.family.name}: {STEPS} steps + load/encode in {trained.seconds:.2f}s, losses {trained.losses}")


def test_a_few_steps_lower_the_loss_on_the_fixed_batch(trained):
    """Overfitting the two example images: with the same noise and timesteps, the trained LoRA denoises
    them better than the base model (the per-step losses draw fresh noise, so they are not compared)."""
    assert trained.fixed_after < trained.fixed_before, (trained.fixed_before, trained.fixed_after)


def test_only_lora_parameters_train_and_they_are_fp32(trained):
    denoiser = trained.family.denoiser(trained.pipe)
    trainable = {n for n, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in denoiser.parameters() if p.requires_grad)
    assert len(trainable) == len(trained.after)


def test_diffusers_file_holds_only_prefixed_lora_keys_and_alpha(trained):
    tensors, meta = lora_keys.load_safetensors(trained.lora_file)
    prefix = trained.family.denoiser_attr + "."
    assert set(tensors) == {prefix + k for k in trained.after}
    assert (meta["lora_rank"], meta["lora_alpha"]) == (str(RANK), str(ALPHA))


def test_saved_lora_loads_into_a_fresh_pipeline_with_its_alpha(trained, tiny_models):
    family = trained.family
    fresh = family.load_pipeline(tiny_models[family.name], torch.float32)
    base_loss = seeded_loss(family, fresh, trained.latents, trained.cond)
    family.load_lora_into_pipeline(fresh, trained.lora_file)
    with torch.no_grad():
        loaded = seeded_loss(family, fresh, trained.latents, trained.cond)
        reference = seeded_loss(family, trained.pipe, trained.latents, trained.cond)
    # Same noise and timesteps: equal losses mean equal denoisers, i.e. the weights and the
    # alpha/rank scale both came through (alpha = rank would give a different loss).
    assert loaded.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    assert loaded.item() != pytest.approx(base_loss.item(), rel=1e-6)


def test_generate_is_seeded_and_changes_with_the_lora(trained, tiny_models):
    family = trained.family
    fresh = family.load_pipeline(tiny_models[family.name], torch.float32)
    base = np.asarray(family.generate(fresh, "a red circle", seed=1, height=64, width=64, steps=2))
    assert np.array_equal(base, np.asarray(family.generate(fresh, "a red circle", 1, 64, 64, 2)))
    family.load_lora_into_pipeline(fresh, trained.lora_file)
    with_lora = np.asarray(family.generate(fresh, "a red circle", seed=1, height=64, width=64, steps=2))
    assert base.shape == with_lora.shape == (64, 64, 3)
    assert not np.array_equal(base, with_lora)


def test_comfyui_export_names_alpha_and_weights(trained):
    family = trained.family
    out = family.to_comfyui(trained.after, RANK, ALPHA)
    module, name, alpha = COMFYUI_EXAMPLE[family.name]
    assert f"{name}.lora_down.weight" in out and f"{name}.lora_up.weight" in out
    assert out[f"{name}.alpha"].item() == alpha
    assert {v.item() for k, v in out.items() if k.endswith(".alpha")} == {ALPHA}
    suffixes = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] if k.endswith(".weight") else "alpha" for k in out}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    if family.name not in COMFYUI_FUSED:
        assert len(out) == 3 * len(lora_keys.peft_modules(trained.after))
        a, b = trained.after[f"{module}.lora_A.weight"], trained.after[f"{module}.lora_B.weight"]
        assert torch.allclose(lora_keys.kohya_delta(out, name), (ALPHA / RANK) * b @ a, atol=1e-6)
    else:
        parts = COMFYUI_FUSED[family.name]
        assert module in parts
        expected = torch.cat([(ALPHA / RANK) * trained.after[f"{p}.lora_B.weight"] @ trained.after[f"{p}.lora_A.weight"]
                              for p in parts])
        assert torch.allclose(lora_keys.kohya_delta(out, name), expected, atol=1e-6)


# Families whose ComfyUI export diffusers also reads (its kohya converters for FLUX.2 and Qwen-Image).
DIFFUSERS_READS_COMFYUI_FILE = {"flux2-klein", "flux2-dev", "qwen-image"}


def test_comfyui_file_loads_through_diffusers_kohya_reader_like_the_diffusers_file(trained, tiny_models, tmp_path):
    """The kohya names of the FLUX.2 export (Black Forest Labs' layout) and of the Qwen-Image export
    (`lora_unet_` + diffusers' module path, with alpha) are the ones diffusers' own kohya converters
    read: loading that file gives the same denoiser as loading the diffusers-layout file."""
    family = trained.family
    if family.name not in DIFFUSERS_READS_COMFYUI_FILE:
        pytest.skip("diffusers reads kohya-named files of this layout for FLUX.2 and Qwen-Image only")
    path = tmp_path / "comfyui.safetensors"
    save_safetensors(family.to_comfyui(trained.after, RANK, ALPHA), path, {})
    fresh = family.load_pipeline(tiny_models[family.name], torch.float32)
    family.load_lora_into_pipeline(fresh, path)
    with torch.no_grad():
        loaded = seeded_loss(family, fresh, trained.latents, trained.cond)
        reference = seeded_loss(family, trained.pipe, trained.latents, trained.cond)
    assert loaded.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)


def test_lora_state_round_trips_into_a_fresh_denoiser(trained, tiny_models):
    family = trained.family
    fresh = family.denoiser(family.load_pipeline(tiny_models[family.name], torch.float32))
    family.add_lora(fresh, RANK, ALPHA, list(family.default_lora_targets))
    family.set_lora_state_dict(fresh, trained.after)
    assert all(torch.equal(v, trained.after[k]) for k, v in family.lora_state_dict(fresh).items())
    with pytest.raises(ValueError, match="--lora_target_modules"):
        family.set_lora_state_dict(fresh, dict(list(trained.after.items())[:-2]))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_default_targets_each_match_and_bad_targets_are_named(tiny_models, name):
    family = get_family(name)
    denoiser = family.denoiser(family.load_pipeline(tiny_models[name], torch.float32))
    for target in family.default_lora_targets:
        assert unmatched_targets(denoiser, [target]) == [], target
    with pytest.raises(ValueError, match="no_such_proj match no linear layer"):
        family.add_lora(denoiser, RANK, ALPHA, ["to_q", "no_such_proj"])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_gradient_checkpointing_gives_identical_loss_and_gradients(tiny_models, example_batch, name, monkeypatch):
    family = get_family(name)
    pipe = family.load_pipeline(tiny_models[name], torch.float32)
    pixels, captions = example_batch
    latents, cond = family.encode_images(pipe, pixels), family.encode_prompts(pipe, captions, CPU)
    denoiser = family.denoiser(pipe)
    family.add_lora(denoiser, RANK, ALPHA, list(family.default_lora_targets))
    with torch.no_grad():   # non-zero B so that A gets gradients as well
        for n, p in denoiser.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.02)
    denoiser.train()

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        loss = seeded_loss(family, pipe, latents, cond)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.grad is not None}
        denoiser.zero_grad(set_to_none=True)
        return loss.item(), grads

    plain_loss, plain_grads = loss_and_grads()
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    # Patched before enabling: diffusers captures the function when checkpointing is switched on.
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    family.enable_gradient_checkpointing(denoiser)
    gc_loss, gc_grads = loss_and_grads()
    assert calls, "no block ran under torch.utils.checkpoint"
    assert gc_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == gc_grads.keys() and plain_grads
    assert all(torch.allclose(plain_grads[k], gc_grads[k], rtol=1e-4, atol=1e-7) for k in plain_grads)
    assert len(family.lora_state_dict(denoiser)) == len(plain_grads), "checkpointing must not hide the LoRA layers"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_bf16_pipeline_trains_with_fp32_loss_and_lora(tiny_models, example_batch, name):
    family = get_family(name)
    pipe = family.load_pipeline(tiny_models[name], torch.bfloat16)
    pixels, captions = example_batch
    latents, cond = family.encode_images(pipe, pixels), family.encode_prompts(pipe, captions, CPU)
    assert latents.dtype == torch.bfloat16
    denoiser = family.denoiser(pipe)
    family.add_lora(denoiser, RANK, ALPHA, list(family.default_lora_targets))
    torch.manual_seed(0)
    loss = family.training_loss(pipe, denoiser, latents, cond)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in denoiser.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_fp16_kolors_encodes_with_an_fp32_vae_and_restores_it(tiny_models, example_batch):
    family = get_family("kolors")
    pixels, _ = example_batch
    reference = family.encode_images(family.load_pipeline(tiny_models["kolors"], torch.float32), pixels)
    pipe = family.load_pipeline(tiny_models["kolors"], torch.float16)
    latents = family.encode_images(pipe, pixels)
    assert pipe.vae.dtype == torch.float16
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
    assert torch.allclose(latents.float(), reference, atol=2e-3)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_non_square_bucket_trains(tiny_models, example_batch, name):
    """Aspect-ratio buckets hand the family landscape and portrait batches: the recipe (latent
    packing, position ids, size conditioning) must follow the batch's shape, not assume a square."""
    family = get_family(name)
    pipe = family.load_pipeline(tiny_models[name], torch.float32)
    pixels, captions = example_batch
    cond = family.encode_prompts(pipe, captions, CPU)
    denoiser = family.denoiser(pipe)
    family.add_lora(denoiser, RANK, ALPHA, list(family.default_lora_targets))
    denoiser.train()
    wide = torch.nn.functional.interpolate(pixels, size=(64, 128), mode="bilinear")
    for batch in (wide, wide.transpose(2, 3).contiguous()):
        latents = family.encode_images(pipe, batch)
        loss = seeded_loss(family, pipe, latents, cond)
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in denoiser.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        denoiser.zero_grad(set_to_none=True)

