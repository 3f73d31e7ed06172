"""Tiny pipelines: real on-disk layout, reload through from_pretrained, working tokenizers."""

from __future__ import annotations

import json

import pytest
import torch

from lorakube_api.contract import FAMILIES
from lorakube_dev import tiny
from lorakube_trainer.families import FAMILY_NAMES, get_family

DENOISER_DIR = {"flux": "transformer", "sd3": "transformer", "kolors": "unet", "hunyuan-dit": "transformer",
                "flux2-klein": "transformer",
                "z-image": "transformer", "qwen-image": "transformer",
                "flux2-dev": "transformer"}


def test_registry_covers_the_contract_families():
    assert set(FAMILY_NAMES) == set(FAMILIES)
    for name in FAMILY_NAMES:
        family = get_family(name)
        assert family.name == name and family.size_multiple > 0


def test_unknown_family_lists_the_valid_names():
    with pytest.raises(ValueError, match="flux, sd3, kolors, hunyuan-dit"):
        get_family("sdxl")
    with pytest.raises(ValueError, match="valid families"):
        tiny.build_tiny_pipeline("sdxl", tiny.Path("unused"))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_saved_in_the_real_layout_and_reloads(tiny_models, name):
    folder = tiny_models[name]
    index = json.loads((folder / "model_index.json").read_text())
    family = get_family(name)
    assert index["_class_name"] == family.pipeline_class_name
    denoiser_dir = folder / DENOISER_DIR[name]
    assert (denoiser_dir / "config.json").is_file()
    assert (denoiser_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = family.load_pipeline(folder, torch.bfloat16)
    denoiser = family.denoiser(pipe)
    assert denoiser.dtype == torch.bfloat16, "bf16 must really load bf16"
    assert not any(p.requires_grad for p in denoiser.parameters())
    assert not denoiser.training


def test_tiny_sd3_is_shaped_like_sd35_medium(tiny_models):
    """The `sd3` family covers SD3.5: its tiny model has MMDiT-X's dual attention (attn2) in block 0 and
    RMS-normed q/k, and the default targets put LoRA on the second attention as well."""
    family = get_family("sd3")
    denoiser = family.denoiser(family.load_pipeline(tiny_models["sd3"], torch.float32))
    assert list(denoiser.config.dual_attention_layers) == [0] and denoiser.config.qk_norm == "rms_norm"
    family.add_lora(denoiser, 4, 4.0, list(family.default_lora_targets))
    assert {"transformer_blocks.0.attn2.to_q.lora_A.weight", "transformer_blocks.0.attn2.to_out.0.lora_B.weight"} <= \
        set(family.lora_state_dict(denoiser))


def test_building_twice_with_one_seed_gives_identical_weights(tiny_models, tmp_path):
    again = tiny.build_tiny_pipeline("flux", tmp_path / "flux")
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (tiny_models["flux"] / name).read_bytes()


def test_build_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    tiny.build_tiny_pipeline("sd3", tmp_path / "sd3")
    assert torch.equal(torch.rand(3), expected)


def _tokenizers(pipe):
    return [c for n, c in pipe.components.items() if n.startswith("tokenizer") and c is not None]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tokenizers_tokenize_real_text(tiny_models, name):
    pipe = get_family(name).load_pipeline(tiny_models[name], torch.float32)
    for tok in _tokenizers(pipe):
        ids = tok("a red circle on a dark background")["input_ids"]
        content = [i for i in ids if i not in tok.all_special_ids]   # includes UNK
        assert len(content) >= 3, f"{type(tok).__name__} produced almost nothing: {ids}"
        # Decoding gives the words back, which an UNK-only tokenizer cannot do.
        assert "red circle" in tok.decode(content).replace("</w>", " ").replace("  ", " ")
        assert tok("a blue square")["input_ids"] != ids


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_prompt_embeddings_depend_on_the_prompt(tiny_models, name):
    family = get_family(name)
    pipe = family.load_pipeline(tiny_models[name], torch.float32)
    cond = family.encode_prompts(pipe, ["a red circle", "a blue square"], torch.device("cpu"))
    for key, value in cond.items():
        assert value.shape[0] == 2, key
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
    embeds = cond["prompt_embeds"]
    assert not torch.allclose(embeds[0], embeds[1])


def test_cli_builds_every_family(tmp_path, capsys):
    assert tiny.main(["--family", "all", "--out", str(tmp_path)]) == 0
    for name in FAMILY_NAMES:
        assert (tmp_path / name / "model_index.json").is_file()
        assert json.loads((tmp_path / name / "TINY_RANDOM_MODEL.json").read_text())["family"] == name
    assert "kolors" in capsys.readouterr().out


def test_load_pipeline_names_a_wrong_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model_path .* no model_index.json"):
        get_family("sd3").load_pipeline(tmp_path, torch.float32)


def test_load_pipeline_names_a_family_mismatch(tiny_models):
    with pytest.raises(ValueError, match="holds a StableDiffusion3Pipeline .*--model_family is flux"):
        get_family("flux").load_pipeline(tiny_models["sd3"], torch.float32)


def test_size_multiples_come_from_the_contract():
    from lorakube_api.contract import SIZE_MULTIPLE

    for name in FAMILY_NAMES:
        assert type(get_family(name)).size_multiple == SIZE_MULTIPLE[name]


def test_flux2_dev_tokenizer_folder_is_a_pixtral_processor_and_loads_without_torchvision(tiny_models):
    """FLUX.2 dev ships `tokenizer/` as a Pixtral processor (model_index names PixtralProcessor, the
    processor and image-processor configs sit next to the tokenizer files); the family loads its
    tokenizer half, which needs no torchvision, and the pipeline's prompt encoding runs with it."""
    folder = tiny_models["flux2-dev"]
    assert json.loads((folder / "model_index.json").read_text())["tokenizer"] == ["transformers", "PixtralProcessor"]
    processor = json.loads((folder / "tokenizer" / "processor_config.json").read_text())
    assert processor["processor_class"] == "PixtralProcessor" and processor["image_token"] == "[IMG]"
    assert (folder / "tokenizer" / "preprocessor_config.json").is_file()
    assert (folder / "tokenizer" / "chat_template.jinja").is_file()
    pipe = get_family("flux2-dev").load_pipeline(folder, torch.float32)
    assert pipe.tokenizer.convert_tokens_to_ids("[IMG]") == pipe.text_encoder.config.image_token_index
    assert pipe.tokenizer.chat_template and "[SYSTEM_PROMPT]" in pipe.tokenizer.chat_template
