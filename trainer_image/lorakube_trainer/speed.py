"""Speed and memory options of the training step, each behind its own flag (README "Performance").

All are opt-in: their effect on a GPU is what bench/trainer_gpu.py measures, and a default changes
only once a measured table says it helps. Each is applied once, while the module is built:

* `--compile_blocks`: torch.compile on each of the denoiser's repeated blocks ("regional"
  compilation): every block of a kind shares one compiled graph, so compile time stays that of one
  block instead of the whole model.
* `--fused_adamw`: torch's single-kernel AdamW over the LoRA parameters.
* `--sdpa_backend`: which scaled-dot-product-attention kernels CUDA may pick (see SDPA_BACKENDS).
* `--channels_last`: NHWC weights and activations for the UNet family (convolutions run faster in
  that layout on tensor cores); a transformer denoiser has one convolution at most, so the flag is
  refused there.
* `--base_weights int8|fp8`: the frozen base's linear layers stored as 8-bit weights (torchao,
  weight-only), the LoRA layers untouched: a 12 B-parameter FLUX base then needs ~12 GB instead of ~24.

torch is imported inside the functions: config.py reads the choices below, and the CLI parses its
flags (and runs --preflight) without importing torch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

# --sdpa_backend -> the CUDA kernels torch may choose from, in (flash, efficient, cudnn, math) order.
# "default" leaves cuDNN out: with torch 2.11+ on H100/H200 its backward returns NaN gradients for
# some bf16 shapes (families.common.avoid_cudnn_attention_backward has the details); "all" is torch's
# own choice, cuDNN included, for a torch where that is fixed. A single kernel makes torch fail
# loudly when that kernel cannot run a shape, instead of silently falling back.
SDPA_BACKENDS = {
    "default": (True, True, False, True),
    "all": (True, True, True, True),
    "flash": (True, False, False, False),
    "efficient": (False, True, False, False),
    "cudnn": (False, False, True, False),
    "math": (False, False, False, True),
}
BASE_WEIGHTS = ("auto", "int8", "fp8")      # auto: the --precision dtype
CHANNELS_LAST_FAMILIES = ("kolors",)        # the UNet family
WEIGHTS_READ_DIRECTLY = ("HunyuanDiTAttentionPool", "MultiheadAttention")


def sdpa_flags() -> tuple[bool, bool, bool, bool]:
    import torch

    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled())


def set_sdpa_flags(flags: tuple[bool, bool, bool, bool]) -> None:
    import torch

    flash, efficient, cudnn, math = flags
    torch.backends.cuda.enable_flash_sdp(flash)
    torch.backends.cuda.enable_mem_efficient_sdp(efficient)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    torch.backends.cuda.enable_math_sdp(math)


def apply_sdpa_backend(name: str, on_cuda: bool | None = None) -> None:
    """Process-wide, like the cuDNN switch it generalises: gradient checkpointing recomputes attention
    during backward, outside any context manager around the forward. Only where CUDA is (default:
    whether it is available): the same switches also gate torch's CPU kernels, and a CPU run would
    fail with no kernel left for e.g. "cudnn"."""
    import torch

    if torch.cuda.is_available() if on_cuda is None else on_cuda:
        set_sdpa_flags(SDPA_BACKENDS[name])


@contextlib.contextmanager
def sdpa_backend(name: str, on_cuda: bool | None = None) -> Iterator[None]:
    """apply_sdpa_backend for a block, restoring the previous switches (the benchmark runs variants
    one after another in one process)."""
    saved = sdpa_flags()
    apply_sdpa_backend(name, on_cuda)
    try:
        yield
    finally:
        set_sdpa_flags(saved)


def repeated_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a denoiser repeats: the classes diffusers lists in `_repeated_blocks` (FLUX's
    double and single blocks, the UNet's transformer blocks), else the members of its top-level
    ModuleLists (SD3's transformer_blocks, Hunyuan-DiT's blocks)."""
    import torch

    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if names:
        return [m for m in denoiser.modules() if type(m).__name__ in names]
    return [block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def compile_blocks(denoiser: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile each repeated block in place (after LoRA injection, so the LoRA layers are inside the
    graph); returns how many. Blocks of one class share one graph: dynamo caches by code object."""
    blocks = repeated_blocks(denoiser)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def quantize_base(denoiser: torch.nn.Module, kind: str) -> int:
    """Store the frozen linear weights of the denoiser as 8-bit (weight-only: activations and the
    LoRA path stay in the compute dtype); returns how many layers. LoRA's own A/B layers are left
    alone, so the trainable weights and their optimizer state keep full precision."""
    import torch

    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError(f"--base_weights {kind} needs torchao: pip install 'lorakube[quantize]'") from exc
    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    chosen: list[str] = []
    # Modules that read their linear layers' weights directly (F.multi_head_attention_forward) instead
    # of calling them, which an 8-bit weight tensor does not support: Hunyuan-DiT's text pooler.
    raw = tuple(f"{n}." for n, m in denoiser.named_modules() if type(m).__name__ in WEIGHTS_READ_DIRECTLY)

    def frozen_linear(module: torch.nn.Module, name: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or ".lora_" in f".{name}" or name.startswith(raw):
            return False
        if module.weight.requires_grad:
            return False
        chosen.append(name)
        return True

    quantize_(denoiser, config, filter_fn=frozen_linear)
    return len(chosen)


def make_optimizer(params: list[torch.nn.Parameter], lr: float, fused: bool) -> torch.optim.Optimizer:
    """torch's AdamW (its defaults, weight decay 0.01, as the original trainer); `fused` picks the
    single-kernel implementation instead of the multi-tensor (foreach) one."""
    import torch

    return torch.optim.AdamW(params, lr=lr, fused=True) if fused else torch.optim.AdamW(params, lr=lr)
