"""Key layouts and alpha handling, on hand-made LoRA tensors (no model needed)."""

from __future__ import annotations

import json

import pytest
import torch

from lorakube_trainer.families import get_family, lora_keys


def _peft_state(modules: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_dim, in_dim) in modules.items():
        state[f"{name}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g)
        state[f"{name}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g)
    return state


def _peft_delta(state: dict[str, torch.Tensor], module: str, rank: int, alpha: float) -> torch.Tensor:
    return (alpha / rank) * state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]


def test_diffusers_layout_prefixes_keys_and_stores_the_lora_config():
    state = _peft_state({"transformer_blocks.0.attn.to_q": (8, 8), "transformer_blocks.0.attn.to_k": (8, 8)})
    tensors, meta = lora_keys.to_diffusers_layout(state, "transformer", rank=4, alpha=16, family="flux")
    assert set(tensors) == {f"transformer.{k}" for k in state}
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 16.0
    assert config["transformer.target_modules"] == ["transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_q"]
    assert (meta["lora_rank"], meta["lora_alpha"], meta["format"]) == ("4", "16.0", "pt")
    back, back_config = lora_keys.from_diffusers_layout(tensors, meta, "transformer")
    assert back.keys() == state.keys() and back_config["lora_alpha"] == 16.0


def test_diffusers_file_round_trip(tmp_path):
    state = _peft_state({"blocks.0.attn1.to_q": (6, 6)})
    get_family("hunyuan-dit").save_diffusers_lora(state, tmp_path / "out" / "lora.safetensors", rank=4, alpha=2)
    tensors, meta = lora_keys.load_safetensors(tmp_path / "out" / "lora.safetensors")
    assert all(torch.equal(tensors[f"transformer.{k}"], v) for k, v in state.items())
    assert meta["lora_alpha"] == "2.0" and meta["lorakube_family"] == "hunyuan-dit"
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_loading_a_file_of_another_family_names_the_problem():
    tensors, meta = lora_keys.to_diffusers_layout(_peft_state({"a.to_q": (4, 4)}), "unet", 4, 4, "kolors")
    with pytest.raises(ValueError, match="another model family"):
        lora_keys.from_diffusers_layout(tensors, meta, "transformer")


def test_peft_modules_rejects_foreign_and_incomplete_keys():
    with pytest.raises(ValueError, match="not a peft LoRA key"):
        lora_keys.peft_modules({"x.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="lacks lora_B"):
        lora_keys.peft_modules({"x.lora_A.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "family, module, expected",
    [
        ("flux", "single_transformer_blocks.0.attn.to_q", "lora_transformer_single_transformer_blocks_0_attn_to_q"),
        ("sd3", "transformer_blocks.1.attn.add_k_proj", "lora_transformer_transformer_blocks_1_attn_add_k_proj"),
        ("kolors", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"),
        # ComfyUI's Qwen-Image uses diffusers' module names, so its generic lora_unet_ map covers them.
        ("qwen-image", "transformer_blocks.3.img_mlp.net.0.proj", "lora_unet_transformer_blocks_3_img_mlp_net_0_proj"),
        ("qwen-image", "transformer_blocks.0.attn.to_out.0", "lora_unet_transformer_blocks_0_attn_to_out_0"),
    ],
)
def test_flat_kohya_names_alpha_and_delta(family, module, expected):
    state = _peft_state({module: (8, 12)}, rank=4)
    out = get_family(family).to_comfyui(state, rank=4, alpha=8.0)
    assert set(out) == {f"{expected}.lora_down.weight", f"{expected}.lora_up.weight", f"{expected}.alpha"}
    assert out[f"{expected}.alpha"].item() == 8.0 and out[f"{expected}.alpha"].dim() == 0
    assert torch.allclose(lora_keys.kohya_delta(out, expected), _peft_delta(state, module, 4, 8.0))


def test_fused_lora_reproduces_each_parts_update():
    q, k = (torch.randn(4, 6), torch.randn(5, 4)), (torch.randn(4, 6), torch.randn(5, 4))
    down, up = lora_keys.fuse_lora([q, k, None])
    assert down.shape == (12, 6) and up.shape == (15, 12)
    delta = (2.0 / down.shape[0]) * up @ down       # what a loader applies for alpha 2
    assert torch.allclose(delta[:5], (2.0 / 4) * q[1] @ q[0])
    assert torch.allclose(delta[5:10], (2.0 / 4) * k[1] @ k[0])
    assert torch.equal(delta[10:], torch.zeros(5, 6))


def test_hunyuan_comfyui_export_uses_official_fused_names():
    dim, rank, alpha = 24, 4, 8.0
    modules = {f"blocks.0.attn1.{m}": (dim, dim) for m in ("to_q", "to_k", "to_v", "to_out.0")}
    modules.update({f"blocks.0.attn2.{m}": (dim, dim) for m in ("to_q", "to_out.0")})
    modules.update({f"blocks.0.attn2.{m}": (dim, 32) for m in ("to_k", "to_v")})
    state = _peft_state(modules, rank=rank)
    out = get_family("hunyuan-dit").to_comfyui(state, rank=rank, alpha=alpha)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in out}
    p = "base_model.model.blocks.0."
    assert names == {p + "attn1.Wqkv", p + "attn1.out_proj", p + "attn2.q_proj", p + "attn2.kv_proj", p + "attn2.out_proj"}
    assert {v.item() for k, v in out.items() if k.endswith(".alpha")} == {alpha}
    assert out[p + "attn1.Wqkv.lora_down.weight"].shape == (3 * rank, dim)
    wqkv = lora_keys.kohya_delta(out, p + "attn1.Wqkv")
    expected = torch.cat([_peft_delta(state, f"blocks.0.attn1.{m}", rank, alpha) for m in ("to_q", "to_k", "to_v")])
    assert torch.allclose(wqkv, expected, atol=1e-5)
    kv = lora_keys.kohya_delta(out, p + "attn2.kv_proj")
    expected = torch.cat([_peft_delta(state, f"blocks.0.attn2.{m}", rank, alpha) for m in ("to_k", "to_v")])
    assert torch.allclose(kv, expected, atol=1e-5)


def test_hunyuan_comfyui_export_rejects_modules_comfyui_cannot_map():
    state = _peft_state({"time_extra_emb.pooler.q_proj": (8, 8)})
    with pytest.raises(ValueError, match="no ComfyUI"):
        get_family("hunyuan-dit").to_comfyui(state, rank=4, alpha=4)
