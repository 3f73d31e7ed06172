"""--lora_target_modules with the original framework's (DiffSynth-Studio's) module names: each maps to
the diffusers layers of the same part of the model, checked against the tiny models' real module
names; unknown names fail with the names that would work."""

from __future__ import annotations

import re

import pytest
import torch

from lorakube_trainer.families import FAMILY_NAMES, get_family
from lorakube_trainer.families.common import target_regex

# The original's default lists (its train_*_lora.py scripts), as a user would copy them.
ORIGINAL_DEFAULTS = {
    "flux": "a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,"
            "norm1_a.linear,norm1_b.linear,to_qkv_mlp",
    "sd3": "a_to_qkv,b_to_qkv,norm_1_a.linear,norm_1_b.linear,a_to_out,b_to_out,ff_a.0,ff_a.2,ff_b.0,ff_b.2",
    "kolors": "to_q,to_k,to_v,to_out",
    "hunyuan-dit": "to_q,to_k,to_v,to_out",
    # DiffSynth-Studio's FLUX.2 klein example already uses diffusers' names (one to_out per single block).
    "flux2-klein": "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,"
                   "to_qkv_mlp_proj,single_transformer_blocks.0.attn.to_out",
}


@pytest.fixture(scope="module")
def denoisers(tiny_models) -> dict[str, torch.nn.Module]:
    out = {}
    for name in FAMILY_NAMES:
        family = get_family(name)
        out[name] = family.denoiser(family.load_pipeline(tiny_models[name], torch.float32))
    return out


def layers(denoiser: torch.nn.Module, targets: list[str]) -> set[str]:
    """The linear layers peft would put a LoRA on, with block indices as "*"."""
    pattern = target_regex(targets)
    return {re.sub(r"(?<=\.)\d+(?=\.)", "*", n) for n, m in denoiser.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_original_name_maps_to_layers_of_the_model(denoisers, name):
    family = get_family(name)
    if name not in ORIGINAL_DEFAULTS:     # a family the original framework never trained has no old names
        assert family.original_target_names == {}
        return
    for original in ORIGINAL_DEFAULTS[name].split(","):   # an original name, or a diffusers name as it stands
        assert original in family.original_target_names or layers(denoisers[name], [original]), original
    for original, targets in family.original_target_names.items():
        assert family.resolve_lora_targets([original]) == list(targets)
        for target in targets:
            assert layers(denoisers[name], [target]), f"{original} -> {target} matches nothing"


def test_flux_names_map_to_the_same_part_of_the_model(denoisers):
    flux, d = get_family("flux"), denoisers["flux"]

    def mapped(*names: str) -> set[str]:
        return layers(d, flux.resolve_lora_targets(names))

    # Fused q/k/v of the double blocks' image stream only; the single blocks' q/k/v belong to to_qkv_mlp.
    assert mapped("a_to_qkv") == {f"transformer_blocks.*.attn.to_{x}" for x in "qkv"}
    assert mapped("b_to_qkv") == {f"transformer_blocks.*.attn.add_{x}_proj" for x in "qkv"}
    assert mapped("to_qkv_mlp") == {f"single_transformer_blocks.*.attn.to_{x}" for x in "qkv"} | {
        "single_transformer_blocks.*.proj_mlp"}
    # The original's proj_out and norm.linear live in single blocks; diffusers' top-level proj_out is not one.
    assert mapped("proj_out") == {"single_transformer_blocks.*.proj_out"}
    assert mapped("norm.linear") == {"single_transformer_blocks.*.norm.linear"}
    assert mapped("a_to_out", "b_to_out") == {"transformer_blocks.*.attn.to_out.0", "transformer_blocks.*.attn.to_add_out"}
    assert mapped("ff_a.0", "ff_a.2", "ff_b.0", "ff_b.2") == {
        "transformer_blocks.*.ff.net.*.proj", "transformer_blocks.*.ff.net.2",
        "transformer_blocks.*.ff_context.net.*.proj", "transformer_blocks.*.ff_context.net.2"}
    assert mapped("norm1_a.linear", "norm1_b.linear") == {"transformer_blocks.*.norm1.linear",
                                                          "transformer_blocks.*.norm1_context.linear"}


@pytest.mark.parametrize("name", ["flux", "sd3", "flux2-klein"])
def test_defaults_train_what_the_originals_default_trained(denoisers, name):
    family, d = get_family(name), denoisers[name]
    original = layers(d, family.resolve_lora_targets(ORIGINAL_DEFAULTS[name].split(",")))
    default = layers(d, list(family.default_lora_targets))
    if name == "flux2-klein":
        # Attention, feed-forward and the single blocks' fused layers; FLUX.2's modulation layers are
        # shared by all blocks (outside them) and stay frozen.
        assert default == original == {n for n in layers(d, ["*"]) if "blocks" in n}
    elif name == "flux":
        # Every linear layer of the double and single blocks: attention, feed-forward, adaLN.
        assert default == original == {n for n in layers(d, ["*"]) if "blocks" in n}
    else:
        # The original's norm_1_*.linear matched no layer of its SD3 model, so it trained attention and
        # feed-forward; the default does the same, and those names (mapped) add the adaLN layers.
        assert original - default == {"transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear"}
        assert default < original


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_name_that_maps_to_nothing_fails_with_the_valid_names(denoisers, name):
    family = get_family(name)
    with pytest.raises(ValueError) as err:
        family.add_lora(denoisers[name], 4, 4.0, family.resolve_lora_targets(["to_q", "no_such_layer"]))
    message = str(err.value)
    assert "--lora_target_modules: no_such_layer match no linear layer" in message
    assert all(original in message for original in family.original_target_names)
    assert "to_q" in message and "*" in message              # diffusers names, block index as *


def test_the_mapping_is_logged_and_diffusers_names_pass_unchanged(caplog):
    flux = get_family("flux")
    with caplog.at_level("INFO", logger="lorakube_trainer.families.base"):
        resolved = flux.resolve_lora_targets(["to_q", "b_to_qkv", "norm.linear", "add_q_proj"])
    assert resolved == ["to_q", "add_q_proj", "add_k_proj", "add_v_proj", "norm.linear"]   # no duplicates
    assert [r.getMessage() for r in caplog.records] == [
        "--lora_target_modules: b_to_qkv (the original framework's name) -> add_q_proj,add_k_proj,add_v_proj"]


def test_z_image_default_trains_attention_and_feed_forward_of_the_main_layers_only(denoisers):
    d = denoisers["z-image"]
    default = layers(d, list(get_family("z-image").default_lora_targets))
    assert default == {f"layers.*.attention.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")} | {
        f"layers.*.feed_forward.w{i}" for i in (1, 2, 3)}
    # The refiners have the same layer names; the default leaves them (and the adaLN layers) frozen.
    assert layers(d, ["to_q"]) == {"layers.*.attention.to_q", "noise_refiner.*.attention.to_q",
                                   "context_refiner.*.attention.to_q"}


def test_qwen_image_default_trains_attention_and_mlp_of_both_streams_except_the_last_blocks_dead_ends(denoisers,
                                                                                                     tiny_models):
    family = get_family("qwen-image")
    attention = {f"transformer_blocks.*.attn.{m}" for m in
                 ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    mlp = {f"transformer_blocks.*.{s}_mlp.net.{m}" for s in ("img", "txt") for m in ("*.proj", "2")}
    assert layers(denoisers["qwen-image"], list(family.default_lora_targets)) == attention | mlp
    # The modulation layers stay frozen.
    assert not layers(denoisers["qwen-image"], list(family.default_lora_targets)) & {
        "transformer_blocks.*.img_mod.1", "transformer_blocks.*.txt_mod.1"}
    # peft puts the LoRA on every block but the last one's text-stream outputs, which never reach the
    # image (a LoRA there gets no gradient, and DDP would wait for one).
    fresh = family.denoiser(family.load_pipeline(tiny_models["qwen-image"], torch.float32))
    family.add_lora(fresh, 4, 4.0, list(family.default_lora_targets))
    modules = {k.rsplit(".lora_", 1)[0] for k in family.lora_state_dict(fresh)}
    last = len(fresh.transformer_blocks) - 1
    dead = {f"transformer_blocks.{last}.{m}" for m in
            ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")}
    assert not modules & dead
    assert {f"transformer_blocks.0.{m.split('.', 2)[2]}" for m in dead} <= modules
    assert len(modules) == len(fresh.transformer_blocks) * 12 - len(dead)


def test_qwen_image_targets_naming_only_dead_layers_are_refused(tiny_models):
    family = get_family("qwen-image")
    fresh = family.denoiser(family.load_pipeline(tiny_models["qwen-image"], torch.float32))
    with pytest.raises(ValueError, match="last block's text-stream layers"):
        family.add_lora(fresh, 4, 4.0, ["transformer_blocks.1.attn.to_add_out"])
