"""Test-only helpers that must be importable from subprocesses. Never used by the CLI.

Lightning's DeepSpeed strategy refuses CPU accelerators (a hard CUDA check) and assumes an
integer device index; DeepSpeed itself runs on CPU. This subclass skips exactly those guards so
ZeRO-1/2/3 can be exercised in CPU tests. It touches Lightning internals and is tied to the pinned
lightning version; production runs use the stock strategy on GPUs.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy

from .strategies import DeepSpeedStrategyScaledOnce


class CPUDeepSpeedStrategyForTests(DeepSpeedStrategyScaledOnce):
    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's CUDA-only guard; keep the parent (DDP) environment setup.
        super(DeepSpeedStrategy, self).setup_environment()

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed's engine compares device_rank (root_device.index) with ints.
        return torch.device("cpu", 0)

    def setup_distributed(self) -> None:
        # Skip the CUDA device-index validation.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
