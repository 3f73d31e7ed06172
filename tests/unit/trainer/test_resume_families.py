"""Exact resume on the real (tiny, random) diffusers pipelines: the rectified-flow families (FLUX,
SD3/SD3.5, FLUX.2 klein, Z-Image with its variable-length caption list) and the DDPM ones. An
interrupted run plus `--resume auto` must write a LoRA file bit-identical to an uninterrupted run with the same seed, and that file must load into a
fresh pipeline."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_testlib import CrashAt, SimulatedNodeLoss, sha256, write_dataset

from lorakube_api import contract
from lorakube_trainer.caching import CachedCaptions
from lorakube_trainer.config import parse_config
from lorakube_trainer.data import CaptionedImages, SampleKey, load_records
from lorakube_trainer.families import get_family
from lorakube_dev.tiny import build_tiny_pipeline
from lorakube_trainer.train import run

SIZES = {"flux": 32, "kolors": 64, "hunyuan-dit": 32, "flux2-klein": 32, "sd3": 32, "z-image": 32, "qwen-image": 32,
         "flux2-dev": 32}
# FLUX.2 dev shares klein's transformer and VAE: its run also takes the bucketed, latent-cached path
# (the dataset has five shapes), so the per-bucket caches of latents and Mistral prompt features resume too.
EXTRA = {"flux2-dev": ("--aspect_ratio_buckets", "--cache_latents", "--center_crop")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_pipeline(family, root / family)
        return cache[family]

    return get


# `make test` resumes one flow family (FLUX) and one DDPM family (Hunyuan-DiT, v-prediction) bit for
# bit; the others are in the slow tier to keep `make test` in its budget: Kolors (~20 s, a 64 px
# UNet), Z-Image (~12 s), FLUX.2 klein (about a minute: Qwen3 through 27 layers per step and
# classifier-free validation), SD3 (SD3.5-medium-shaped), Qwen-Image (16-26 s: a video VAE and
# classifier-free validation) and FLUX.2 dev (about 25 s: Mistral 3 through 30 layers, bucketed and cached).
@pytest.mark.parametrize("family", ["flux", pytest.param("kolors", marks=pytest.mark.slow), "hunyuan-dit",
                                    pytest.param("flux2-klein", marks=pytest.mark.slow),
                                    pytest.param("sd3", marks=pytest.mark.slow),
                                    pytest.param("z-image", marks=pytest.mark.slow),
                                    pytest.param("qwen-image", marks=pytest.mark.slow),
                                    pytest.param("flux2-dev", marks=pytest.mark.slow)])
def test_resume_is_bit_identical(family: str, tiny, dataset: Path, tmp_path: Path) -> None:
    size = str(SIZES[family])

    def cfg(out: str):
        return parse_config([
            "--model_family", family, "--model_path", str(tiny(family)), "--dataset_path", str(dataset),
            "--output_path", str(tmp_path / out), "--height", size, "--width", size, "--precision", "32",
            "--steps_per_epoch", "3", "--max_epochs", "2", "--batch_size", "2", "--random_flip",
            "--checkpoint_every_n_steps", "2", "--validation_inference_steps", "2", "--seed", "11",
            "--use_gradient_checkpointing", *EXTRA.get(family, ()),
        ], env={})

    whole = run(cfg("whole"), env={})
    with pytest.raises(SimulatedNodeLoss):
        run(cfg("cut"), env={}, extra_callbacks=[CrashAt(3)])   # last checkpoint: step 2, mid-epoch 0
    resumed = run(cfg("cut"), env={})
    assert resumed.steps_done == whole.steps_done == 6
    name = contract.ARTIFACT_LORA_DIFFUSERS
    assert sha256(tmp_path / "whole" / name) == sha256(tmp_path / "cut" / name)
    for key, tensor in whole.final_lora.items():
        assert tensor.equal(resumed.final_lora[key]), key
    assert (tmp_path / "cut" / contract.ARTIFACT_LORA_COMFYUI).is_file()
    if "--cache_latents" in EXTRA.get(family, ()):
        assert any((tmp_path / "cut" / "latent-cache").rglob("*")), "the cached path was not taken"


# slow: ~11 s; tests/unit/trainer/test_training.py keeps the cached-vs-uncached comparison on the toy family
@pytest.mark.slow
def test_cached_latents_match_the_uncached_path_on_flux(tiny, dataset: Path, tmp_path: Path) -> None:
    """The cache holds what the encoders would give for the same sample (flip included), and a
    cached run's first loss equals the uncached one (Adam turns float noise in near-zero LoRA
    gradients into full-size steps, so later weights are compared only in the toy-family test)."""
    def cfg(out: str, *extra: str):
        return parse_config([
            "--model_family", "flux", "--model_path", str(tiny("flux")), "--dataset_path", str(dataset),
            "--output_path", str(tmp_path / out), "--height", "32", "--width", "32", "--precision", "32",
            "--steps_per_epoch", "4", "--batch_size", "2", "--center_crop", "--random_flip",
            "--checkpoint_every_n_steps", "0", "--validation_inference_steps", "2", "--output_formats", "diffusers",
            *extra,
        ], env={})

    run(cfg("plain"), env={})
    cached_cfg = cfg("cached", "--cache_latents")
    run(cached_cfg, env={})
    first = [json.loads((tmp_path / d / contract.ARTIFACT_METRICS).read_text().splitlines()[0])["loss"]
             for d in ("plain", "cached")]
    assert first[0] == pytest.approx(first[1], rel=1e-5)

    family = get_family("flux")
    pipe = family.load_pipeline(cached_cfg.model_path, torch.float32)
    records = load_records(dataset)
    common = dict(seed=cached_cfg.seed, height=32, width=32, center_crop=True, random_flip=True, samples_per_epoch=8)
    folder = next((tmp_path / "cached" / "latent-cache").iterdir())
    plain_ds, cached_ds = CaptionedImages(records, **common), CachedCaptions(records, folder, **common)
    for position in range(8):
        key = SampleKey(0, position)
        expected = family.encode_images(pipe, plain_ds[key]["pixels"][None])[0]
        item = cached_ds[key]
        assert torch.allclose(item["latents"], expected, atol=1e-5), position
        cond = family.encode_prompts(pipe, [item["text"]], torch.device("cpu"))
        assert all(torch.allclose(item["cond"][k], v[0], atol=1e-6) for k, v in cond.items())


@pytest.mark.slow
def test_qwen_image_bucketed_cached_run_resumes_bit_identically(tiny, tmp_path: Path) -> None:
    """The real Qwen-Image pipeline on images of mixed aspect ratios: each trains in its bucket (sides
    multiples of 16, landscape and portrait kept), the latents and the padded Qwen2.5-VL conditioning
    come from the cache, and an interrupted run resumes to a bit-identical LoRA."""
    dataset = write_dataset(tmp_path / "mixed", [(64, 32), (64, 32), (32, 64), (32, 64), (40, 40), (40, 40)])

    def cfg(out: str):
        return parse_config([
            "--model_family", "qwen-image", "--model_path", str(tiny("qwen-image")), "--dataset_path", str(dataset),
            "--output_path", str(tmp_path / out), "--height", "32", "--width", "32", "--aspect_ratio_buckets",
            "--cache_latents", "--center_crop", "--random_flip", "--precision", "32", "--steps_per_epoch", "3",
            "--max_epochs", "2", "--batch_size", "2", "--checkpoint_every_n_steps", "2",
            "--validation_inference_steps", "2", "--seed", "11", "--output_formats", "diffusers",
        ], env={})

    whole = run(cfg("whole"), env={})
    with pytest.raises(SimulatedNodeLoss):
        run(cfg("cut"), env={}, extra_callbacks=[CrashAt(3)])
    resumed = run(cfg("cut"), env={})
    assert resumed.steps_done == whole.steps_done == 6
    name = contract.ARTIFACT_LORA_DIFFUSERS
    assert sha256(tmp_path / "whole" / name) == sha256(tmp_path / "cut" / name)
    records = sorted((tmp_path / "cut" / "latent-cache").glob("*/record-*.safetensors"))
    assert len(records) == 6
    shapes = set()
    for path in records:
        tensors = load_file(path)
        assert tensors["latents"].shape[:2] == (2, 16)              # plain and mirrored, 16 channels
        assert tensors["cond.prompt_embeds"].shape[0] == tensors["cond.prompt_mask"].shape[0] == 512
        shapes.add(tuple(8 * n for n in tensors["latents"].shape[-2:]))
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in shapes)
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes), shapes
