"""LoRA key layouts: peft (what training holds), diffusers (what `load_lora_weights` reads) and
kohya/ComfyUI (what ComfyUI's LoRA loader maps), with alpha carried everywhere.

peft layout, as `get_peft_model_state_dict` returns it:
    <module path>.lora_A.weight  (rank x in)      <module path>.lora_B.weight  (out x rank)
    scale = lora_alpha / rank

diffusers layout: the same keys prefixed with the pipeline component ("transformer." / "unet."),
and the LoraConfig kwargs JSON-encoded under the safetensors metadata key
`lora_adapter_metadata` with the same prefix. diffusers 0.42 builds the LoraConfig from that JSON
when it is present (`_create_lora_config`), which is what makes a file with alpha != rank load
with the right scale; without it diffusers would assume alpha = rank.

kohya/ComfyUI layout: `<name>.lora_down.weight` (= A), `<name>.lora_up.weight` (= B) and a
scalar `<name>.alpha`; ComfyUI scales by alpha / rank(lora_down). Names per family:
    FLUX, SD3    lora_transformer_<diffusers module path, dots -> underscores>
                 (ComfyUI's key map lists this "OneTrainer" name for every diffusers module of
                 its Flux and SD3 models and slices it into the fused qkv weights itself)
    Kolors       lora_unet_<diffusers module path, dots -> underscores>
                 (ComfyUI maps diffusers UNet names through `unet_to_diffusers`; Kolors is an SDXL UNet)
    FLUX.2       lora_unet_<Black Forest Labs' module path, dots -> underscores>, q/k/v fused
                 (double_blocks_N_img_attn_qkv, single_blocks_N_linear1, ...: the checkpoint layout
                 ComfyUI runs FLUX.2 in; diffusers' own kohya FLUX.2 converter reads the same names)
    Hunyuan-DiT  base_model.model.<original HunyuanDiT module path>
                 (ComfyUI's HunyuanDiT key map only knows the official Tencent module names, where
                 q/k/v are fused into attn1.Wqkv and k/v into attn2.kv_proj; see `fuse_lora`)
    Z-Image      lycoris_<diffusers module path, dots -> underscores>
                 (ComfyUI's Lumina2/Z-Image key map lists this SimpleTuner name, and `transformer.<path>`,
                 for every diffusers module and slices to_q/to_k/to_v into its fused qkv itself)
    Qwen-Image   lora_unet_<diffusers module path, dots -> underscores>
                 (ComfyUI's Qwen-Image model keeps diffusers' module names, so its generic lora_unet_
                 map covers every layer; diffusers' Qwen-Image kohya reader takes the same names)
Every `.alpha` in an export equals the trained alpha.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"   # diffusers' name (loaders/lora_base.py)
LAYOUT_METADATA_KEY = "lorakube_layout"

_PEFT_SUFFIX = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def peft_modules(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group a peft state dict into {module path: (A, B)}; any other key is an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _PEFT_SUFFIX.match(key)
        if m is None:
            raise ValueError(f"not a peft LoRA key: {key!r} (expected '<module>.lora_A.weight' / '.lora_B.weight')")
        parts.setdefault(m["module"], {})[m["which"]] = value
    out = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} lacks lora_{'B' if 'A' in ab else 'A'}.weight")
        out[module] = (ab["A"], ab["B"])
    return out


def lora_config_kwargs(state: Mapping[str, torch.Tensor], rank: int, alpha: float) -> dict:
    """LoraConfig kwargs that rebuild exactly these adapters: the exact module paths as targets."""
    return {
        "r": int(rank),
        "lora_alpha": float(alpha),
        "target_modules": sorted(peft_modules(state)),
        "lora_dropout": 0.0,
        "bias": "none",
    }


# --- diffusers layout -------------------------------------------------------------------------

def to_diffusers_layout(
    state: Mapping[str, torch.Tensor], prefix: str, rank: int, alpha: float, family: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft state -> (tensors with `<prefix>.` keys, safetensors metadata)."""
    config = lora_config_kwargs(state, rank, alpha)
    tensors = {f"{prefix}.{k}": v.detach().contiguous() for k, v in state.items()}
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True),
        LAYOUT_METADATA_KEY: "diffusers",
        "lorakube_family": family,
        "lora_rank": str(int(rank)),
        "lora_alpha": str(float(alpha)),
    }
    return tensors, metadata


def from_diffusers_layout(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, prefix: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of `to_diffusers_layout`: (peft state, LoraConfig kwargs)."""
    p = f"{prefix}."
    stray = [k for k in tensors if not k.startswith(p)]
    if stray:
        raise ValueError(f"LoRA file has keys outside '{p}*', e.g. {stray[0]!r}; is it for another model family?")
    state = {k[len(p):]: v for k, v in tensors.items()}
    raw = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if raw is None:
        raise ValueError(f"LoRA file has no '{LORA_ADAPTER_METADATA_KEY}' metadata, so rank/alpha are unknown")
    config = {k[len(p):]: v for k, v in json.loads(raw).items() if k.startswith(p)}
    return state, config


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# --- kohya / ComfyUI layout -------------------------------------------------------------------

def kohya_entry(name: str, a: torch.Tensor, b: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    return {
        f"{name}.lora_down.weight": a.detach().contiguous(),
        f"{name}.lora_up.weight": b.detach().contiguous(),
        f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32),
    }


def to_kohya_flat(state: Mapping[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """`<prefix><module path with '.' -> '_'>.lora_down/lora_up/alpha` for every LoRA module."""
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in peft_modules(state).items():
        out.update(kohya_entry(prefix + module.replace(".", "_"), a, b, alpha))
    return out


def fuse_lora(parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA (down, up) for a fused linear layer (rows = the parts' outputs stacked) from the
    per-part LoRAs, keeping the file's alpha equal to the trained alpha.

    ΔW_fused = blockdiag(B_1..B_n) @ [A_1; ..; A_n] gives each part its own update. The fused rank
    is n·r, so a loader scaling by alpha/rank would shrink it n-fold; the up blocks are multiplied
    by n to compensate (alpha/(n·r) · n·B = alpha/r · B). A part that was not trained contributes
    zero rows (its A and B blocks are zeros).
    """
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("fuse_lora needs at least one trained part")
    a0, b0 = present[0]
    rank, out_dim = a0.shape[0], b0.shape[0]
    filled = [p if p is not None else (torch.zeros_like(a0), torch.zeros_like(b0)) for p in parts]
    for a, b in filled:
        if a.shape[0] != rank or b.shape[0] != out_dim:
            raise ValueError("fused parts must share rank and output size")
    down = torch.cat([a for a, _ in filled], dim=0)
    up = torch.block_diag(*[b for _, b in filled]) * len(parts)
    return down, up


# Hunyuan-DiT: diffusers module (inside blocks.N) -> (official module, part index, number of parts)
_HUNYUAN_MAP = {
    "attn1.to_q": ("attn1.Wqkv", 0, 3),
    "attn1.to_k": ("attn1.Wqkv", 1, 3),
    "attn1.to_v": ("attn1.Wqkv", 2, 3),
    "attn1.to_out.0": ("attn1.out_proj", 0, 1),
    "attn2.to_q": ("attn2.q_proj", 0, 1),
    "attn2.to_k": ("attn2.kv_proj", 0, 2),
    "attn2.to_v": ("attn2.kv_proj", 1, 2),
    "attn2.to_out.0": ("attn2.out_proj", 0, 1),
    "ff.net.0.proj": ("mlp.fc1", 0, 1),
    "ff.net.2": ("mlp.fc2", 0, 1),
}
HUNYUAN_COMFYUI_PREFIX = "base_model.model."
_HUNYUAN_BLOCK = re.compile(r"^blocks\.(?P<i>\d+)\.(?P<rest>.+)$")


def hunyuan_fused_modules(modules: Iterable[str]) -> dict[str, list[str | None]]:
    """{official module path: [diffusers module path or None per fused part]}; raises for modules
    that have no official counterpart ComfyUI could map."""
    fused: dict[str, list[str | None]] = {}
    for module in modules:
        m = _HUNYUAN_BLOCK.match(module)
        if m is None or m["rest"] not in _HUNYUAN_MAP:
            raise ValueError(
                f"Hunyuan-DiT LoRA module {module!r} has no ComfyUI (official HunyuanDiT) name; ComfyUI export "
                f"supports blocks.N.{{{', '.join(_HUNYUAN_MAP)}}}. Drop it from --lora_target_modules or "
                f"leave 'comfyui' out of the output formats."
            )
        official, index, n = _HUNYUAN_MAP[m["rest"]]
        slots = fused.setdefault(f"blocks.{m['i']}.{official}", [None] * n)
        slots[index] = module
    return fused


def to_comfyui_hunyuan(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    modules = peft_modules(state)
    out: dict[str, torch.Tensor] = {}
    for official, members in hunyuan_fused_modules(modules).items():
        down, up = fuse_lora([modules[m] if m else None for m in members])
        out.update(kohya_entry(HUNYUAN_COMFYUI_PREFIX + official, down, up, alpha))
    return out


def kohya_delta(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW a kohya/ComfyUI loader applies for `name` at strength 1: alpha/rank · up @ down."""
    down, up = state[f"{name}.lora_down.weight"].float(), state[f"{name}.lora_up.weight"].float()
    return (state[f"{name}.alpha"].float() / down.shape[0]) * (up @ down)


# FLUX.2: diffusers module -> (Black Forest Labs module, part index, number of parts). Double blocks
# fuse q/k/v per stream; a single block's to_qkv_mlp_proj is already fused (linear1).
_FLUX2_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 3),
    "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.linear_in": ("img_mlp.0", 0, 1),
    "ff.linear_out": ("img_mlp.2", 0, 1),
    "ff_context.linear_in": ("txt_mlp.0", 0, 1),
    "ff_context.linear_out": ("txt_mlp.2", 0, 1),
}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", 0, 1), "attn.to_out": ("linear2", 0, 1)}
_FLUX2_TOP = {
    "x_embedder": ("img_in", 0, 1),
    "context_embedder": ("txt_in", 0, 1),
    "time_guidance_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0, 1),
    "time_guidance_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0, 1),
    "proj_out": ("final_layer.linear", 0, 1),
}
_FLUX2_BLOCK = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.(?P<rest>.+)$")
FLUX2_COMFYUI_PREFIX = "lora_unet_"


def _flux2_official(module: str) -> tuple[str, int, int]:
    m = _FLUX2_BLOCK.match(module)
    if m is None:
        hit = _FLUX2_TOP.get(module)
        official = hit and hit[0]
    else:
        table, blocks = (_FLUX2_DOUBLE, "double_blocks") if m["kind"] == "transformer_blocks" else \
            (_FLUX2_SINGLE, "single_blocks")
        hit = table.get(m["rest"])
        official = hit and f"{blocks}.{m['i']}.{hit[0]}"
    if hit is None:
        raise ValueError(
            f"FLUX.2 LoRA module {module!r} has no ComfyUI (Black Forest Labs checkpoint) name; ComfyUI export "
            f"supports transformer_blocks.N.{{{', '.join(_FLUX2_DOUBLE)}}}, single_transformer_blocks.N."
            f"{{{', '.join(_FLUX2_SINGLE)}}} and {', '.join(_FLUX2_TOP)}. Drop it from --lora_target_modules "
            f"or leave 'comfyui' out of the output formats."
        )
    return official, hit[1], hit[2]


def to_kohya_flux2(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """kohya names of the Black Forest Labs layout, with q/k/v LoRAs fused as in `fuse_lora`."""
    modules = peft_modules(state)
    fused: dict[str, list[str | None]] = {}
    for module in modules:
        official, index, n = _flux2_official(module)
        fused.setdefault(official, [None] * n)[index] = module
    out: dict[str, torch.Tensor] = {}
    for official, members in fused.items():
        down, up = fuse_lora([modules[m] if m else None for m in members])
        out.update(kohya_entry(FLUX2_COMFYUI_PREFIX + official.replace(".", "_"), down, up, alpha))
    return out
