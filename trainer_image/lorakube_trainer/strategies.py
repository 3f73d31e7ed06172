"""--training_strategy and --precision -> what Lightning and the weight loader get."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from .config import ConfigError

# --precision -> (Lightning precision, dtype the frozen base weights load in). "16" keeps the original
# trainer's meaning (Lightning's old alias for 16-mixed); the trainable LoRA stays fp32 in all cases.
PRECISION = {
    "32": ("32-true", torch.float32),
    "16": ("16-mixed", torch.float16),
    "16-mixed": ("16-mixed", torch.float16),
    "bf16-mixed": ("bf16-mixed", torch.bfloat16),
}

DEEPSPEED_STAGES = {"deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3}


def resolve_precision(precision: str | None, on_gpu: bool) -> str:
    """The flag's value, or the default for the accelerator; fp16 is refused on CPU, where fp16
    autocast breaks the VAE's group norm (and would be slow anyway)."""
    if precision is None:
        return "16-mixed" if on_gpu else "32"
    if not on_gpu and weight_dtype(precision) == torch.float16:
        raise ConfigError("--precision", f"{precision} needs a GPU; on CPU use 32 or bf16-mixed")
    return precision


def lightning_precision(precision: str) -> str:
    return PRECISION[precision][0]


def weight_dtype(precision: str) -> torch.dtype:
    return PRECISION[precision][1]


def deepspeed_stage(name: str) -> int | None:
    return DEEPSPEED_STAGES.get(name)


@dataclasses.dataclass(frozen=True)
class StrategyPlan:
    name: str
    world_size: int
    on_gpu: bool
    timeout_s: float


class DeepSpeedStrategyScaledOnce(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, with each micro-batch's loss divided by the accumulation once.

    Lightning's training loop already divides the loss by accumulate_grad_batches before backward
    (as for DDP), and DeepSpeedEngine.backward divides it again by its gradient_accumulation_steps
    (which Lightning sets to the same number) unless told `scale_wrt_gas=False`. Without this, a
    ZeRO run with accumulation gets gradients 1/accumulate of the DDP run's: AdamW hides most of
    that, but not where gradients approach its eps, nor for fp16 loss scaling (found by
    tests/integration/trainer/test_two_rank_accumulation.py; Lightning-AI/pytorch-lightning#6170
    describes the double scaling).
    """

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)


def build_strategy(plan: StrategyPlan) -> Strategy | str:
    """DDP by default (gloo on CPU, nccl on GPU), DeepSpeed ZeRO as named.

    The process-group timeout is the rendezvous timeout, so a missing peer ends the run within it.
    """
    timeout = dt.timedelta(seconds=plan.timeout_s)
    backend = "nccl" if plan.on_gpu else "gloo"
    stage = deepspeed_stage(plan.name)
    if stage is not None:
        return DeepSpeedStrategyScaledOnce(stage=stage, process_group_backend=backend, timeout=timeout)
    if plan.world_size == 1:
        return "auto"       # one process: no process group to form
    # find_unused_parameters stays off: every LoRA layer sits on the forward path of every step.
    return DDPStrategy(process_group_backend=backend, timeout=timeout, find_unused_parameters=False)
