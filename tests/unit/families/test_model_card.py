"""The model card tells each family's user which LoRA file to load where, and what ComfyUI does with
the diffusers-layout file (FLUX/SD3: keys loaded, alpha ignored; Kolors/Hunyuan-DiT: keys unknown)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakube_api import contract
from lorakube_trainer.artifacts import write_model_card
from lorakube_trainer.families import FAMILY_NAMES, get_family

DIFFUSERS, COMFYUI = contract.ARTIFACT_LORA_DIFFUSERS, contract.ARTIFACT_LORA_COMFYUI


def card(tmp_path: Path, name: str, *, rank: int = 4, alpha: float = 8.0,
         formats: tuple[str, ...] = contract.OUTPUT_FORMATS) -> str:
    path = tmp_path / contract.ARTIFACT_MODEL_CARD
    write_model_card(path, family=get_family(name), model_path="/models/base", rank=rank, alpha=alpha, steps=10,
                     targets=["to_q"], prompts=["a cat"], formats=formats)
    return path.read_text()


def test_card_says_what_the_guidance_embedding_was_fed(tmp_path):
    path = tmp_path / contract.ARTIFACT_MODEL_CARD
    write_model_card(path, family=get_family("flux2-dev"), model_path="/m", rank=4, alpha=4, steps=1, targets=["to_q"],
                     prompts=["a cat"], formats=contract.OUTPUT_FORMATS, guidance=3.5)
    assert "- guidance embedding fed 3.5 while training (--guidance_scale)" in path.read_text()
    assert "guidance embedding" not in card(tmp_path, "sd3")


def line_about(text: str, file: str) -> str:
    """The bullet that introduces `file`, with its continuation lines."""
    bullets = text.split("\n- ")
    return next(b for b in bullets if b.startswith(f"`{file}`"))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_card_names_the_file_for_diffusers_and_the_file_for_comfyui(tmp_path, name):
    text = card(tmp_path, name)
    assert "ComfyUI" in line_about(text, COMFYUI) and "models/loras" in line_about(text, COMFYUI)
    about_diffusers = line_about(text, DIFFUSERS)
    assert f"use `{COMFYUI}` there" in about_diffusers
    if name == "hunyuan-dit":
        assert "diffusers has no LoRA loader" in about_diffusers and "inject_adapter_in_model" in about_diffusers
    else:
        assert "pipe.load_lora_weights(folder)" in about_diffusers


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_flux_and_sd3_cards_say_comfyui_ignores_the_diffusers_files_alpha(tmp_path, name):
    about = line_about(card(tmp_path, name, rank=4, alpha=8.0), DIFFUSERS)
    assert "ComfyUI loads its keys but not its alpha" in about
    assert "scale 1 instead of alpha/rank = 2" in about
    same = line_about(card(tmp_path, name, rank=4, alpha=4.0), DIFFUSERS)
    assert "with alpha = rank the scale happens to be right" in same


@pytest.mark.parametrize("name", ["kolors", "hunyuan-dit"])
def test_kolors_and_hunyuan_cards_say_comfyui_cannot_read_the_diffusers_file(tmp_path, name):
    comfyui_note = line_about(card(tmp_path, name), DIFFUSERS).split("\n")[1]
    assert "ComfyUI does not recognise its keys and applies nothing from it" in comfyui_note


def test_without_the_comfyui_file_the_card_says_how_to_get_one(tmp_path):
    text = card(tmp_path, "kolors", formats=("diffusers",))
    assert f"this run wrote no `{COMFYUI}` (add comfyui to the output formats" in line_about(text, DIFFUSERS)
    assert f"\n- `{COMFYUI}`" not in text
