"""An exponential moving average of the LoRA weights (--ema_decay).

The average is kept in fp32 next to the weights it follows (same device), keyed like
Family.lora_state_dict, and updated once per optimizer step: ema = decay * ema + (1 - decay) * w.
It is saved in every checkpoint (ema.safetensors) and restored on resume, so a resumed run's
average equals an uninterrupted run's bit for bit; the exported LoRA is the average.

Every process keeps its own copy: with DDP and ZeRO stages 1-2 all processes hold the same LoRA
weights, so the copies agree; ZeRO-3 splits the weights and is refused in config.py.
"""

from __future__ import annotations

from typing import Callable

import torch


class LoraEma:
    def __init__(self, decay: float, weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        # Asked for the live LoRA tensors at every update, never kept: a device move or DeepSpeed's
        # flattening replaces a parameter's storage, which would leave a kept view stale.
        self._weights = weights
        self.average = {name: w.detach().float().clone() for name, w in weights().items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, weight in self._weights().items():
            self.average[name].lerp_(weight.detach().float(), 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The average on the CPU in fp32, as it is saved and exported."""
        return {name: t.detach().to("cpu", torch.float32).clone() for name, t in self.average.items()}

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.average) - set(saved))
        if missing:
            raise ValueError(f"the saved EMA lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
        for name, tensor in self.average.items():
            tensor.copy_(saved[name].to(tensor.device, torch.float32))
