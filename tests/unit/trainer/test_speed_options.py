"""The speed and memory flags (speed.py) on the tiny FLUX and Kolors models, on CPU: each one takes
effect on the module the trainer builds, and the training step's losses stay those of the plain run.
What they gain on a GPU is bench/trainer_gpu.py's job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakube_dev.tiny import build_tiny_pipeline
from lorakube_trainer import speed
from lorakube_trainer.config import ConfigError, parse_config
from lorakube_trainer.families import get_family
from lorakube_trainer.module import LoRAModule


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_pipeline(name, root / name) for name in ("flux", "kolors")}


def _cfg(family: str, model: Path, *flags: str):
    return parse_config(["--model_family", family, "--model_path", str(model), "--dataset_path", "unused",
                         "--output_path", "unused", "--height", "64", "--width", "64", "--precision", "32",
                         "--lora_rank", "4", "--learning_rate", "1e-2", *flags], env={})


def _module(family_name: str, model: Path, *flags: str) -> LoRAModule:
    family = get_family(family_name)
    cfg = _cfg(family_name, model, *flags)
    torch.manual_seed(0)                    # the LoRA's initial values
    pipe = family.load_pipeline(model, torch.float32)
    return LoRAModule(family, pipe, cfg, list(family.default_lora_targets), torch.float32)


def _losses(module: LoRAModule, steps: int = 3) -> list[float]:
    """The module's own training_step and configure_optimizers, one fixed batch, the same noise and
    timestep every step (so a falling loss means the LoRA learned)."""
    gen = torch.Generator().manual_seed(1)
    channels = module.denoiser.config.in_channels // (4 if module.family.name == "flux" else 1)
    batch = {"pixels": torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1, "text": ["a red circle"]}
    with torch.no_grad():
        latents = module.family.encode_images(module.pipe, batch["pixels"])
        cond = module.family.encode_prompts(module.pipe, batch["text"], torch.device("cpu"))
    assert latents.shape[1] == channels
    optimizer = module.configure_optimizers()
    losses = []
    for i in range(steps):
        torch.manual_seed(100)
        loss = module.training_step({"latents": latents, "cond": cond}, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.fixture(scope="module")
def plain_flux(tiny) -> list[float]:
    return _losses(_module("flux", tiny["flux"]))


def test_fused_adamw_takes_the_fused_kernel_with_the_same_losses(tiny, plain_flux) -> None:
    module = _module("flux", tiny["flux"], "--fused_adamw")
    assert module.configure_optimizers().defaults["fused"] is True
    assert _losses(module) == pytest.approx(plain_flux, rel=1e-5)


@pytest.mark.parametrize("backend", sorted(speed.SDPA_BACKENDS))
def test_sdpa_backend_sets_the_cuda_kernel_switches(backend: str) -> None:
    saved = speed.sdpa_flags()
    try:
        with speed.sdpa_backend(backend, on_cuda=True):
            assert speed.sdpa_flags() == speed.SDPA_BACKENDS[backend]
        assert speed.sdpa_flags() == saved
    finally:
        speed.set_sdpa_flags(saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU case")
def test_sdpa_backend_leaves_a_cpu_run_alone(tiny, plain_flux) -> None:
    """The switches also gate torch's CPU kernels ("cudnn" alone would leave none): on CPU the flag
    changes nothing and the losses are the plain run's."""
    saved = speed.sdpa_flags()
    module = _module("flux", tiny["flux"], "--sdpa_backend", "cudnn")
    assert speed.sdpa_flags() == saved
    assert _losses(module) == pytest.approx(plain_flux, rel=1e-6)


@pytest.mark.slow
def test_compile_blocks_compiles_each_repeated_block_with_the_same_losses(tiny, plain_flux) -> None:
    """The flag end to end with inductor (C++ code generation: minutes on a busy 2-core host)."""
    torch._dynamo.reset()
    module = _module("flux", tiny["flux"], "--compile_blocks")
    blocks = speed.repeated_blocks(module.denoiser)
    # FLUX's one double and one single block (the tiny model has one of each), LoRA layers inside.
    assert [type(b).__name__ for b in blocks] == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert _losses(module) == pytest.approx(plain_flux, rel=1e-4)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_blocks_trace_the_lora_layers_and_keep_the_losses(tiny, plain_flux) -> None:
    """The same regional compilation with dynamo + AOT autograd but no code generation (still ~1 min
    of tracing on a busy 2-core host, hence slow too):
    the LoRA'd blocks trace and the training step's losses are unchanged."""
    torch._dynamo.reset()
    module = _module("flux", tiny["flux"])
    assert speed.compile_blocks(module.denoiser, backend="aot_eager") == 2
    assert _losses(module) == pytest.approx(plain_flux, rel=1e-5)
    torch._dynamo.reset()


def test_channels_last_puts_the_unet_convolutions_in_nhwc_with_the_same_losses(tiny) -> None:
    plain = _losses(_module("kolors", tiny["kolors"]))
    module = _module("kolors", tiny["kolors"], "--channels_last")
    conv = module.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert _losses(module) == pytest.approx(plain, rel=1e-4)


def test_int8_base_weights_quantize_the_frozen_layers_and_the_lora_still_learns(tiny, plain_flux) -> None:
    module = _module("flux", tiny["flux"], "--base_weights", "int8")
    to_q = module.denoiser.transformer_blocks[0].attn.to_q
    assert "Int8" in type(to_q.base_layer.weight).__name__          # the frozen base: 8-bit
    assert to_q.lora_A["default"].weight.dtype == torch.float32       # the LoRA: untouched, trainable
    assert to_q.lora_A["default"].weight.requires_grad
    losses = _losses(module, steps=6)
    assert losses[-1] < losses[0]
    # Step 0 is the base model (LoRA B starts at zero): 8-bit weights move its loss only a little.
    assert losses[0] == pytest.approx(plain_flux[0], rel=0.05)
    # The saved LoRA has the same keys and shapes as a plain run's.
    plain = _module("flux", tiny["flux"])
    ours = module.family.lora_state_dict(module.denoiser)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in plain.family.lora_state_dict(plain.denoiser).items()}


@pytest.mark.parametrize(("flags", "named"), [
    (("--channels_last",), "--channels_last: only changes the UNet family"),
    (("--base_weights", "fp8", "--accelerator", "cpu"), "--base_weights: fp8 weights need a GPU"),
    (("--base_weights", "int8", "--training_strategy", "deepspeed_stage_2"), "--base_weights: int8 cannot be combined"),
])
def test_impossible_combinations_are_refused_naming_the_flag(tiny, flags: tuple[str, ...], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        _cfg("flux", tiny["flux"], *flags)
