"""The CLI's DeepSpeed strategies scale the loss for accumulation once (Lightning does it), and the
CPU test strategy that tests/integration/trainer/test_two_rank_accumulation.py compares with DDP is
that same class, so the comparison covers what the CLI runs."""

from __future__ import annotations

import pytest

from lorakube_trainer.strategies import DeepSpeedStrategyScaledOnce, StrategyPlan, build_strategy
from lorakube_trainer.testing import CPUDeepSpeedStrategyForTests


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cli_deepspeed_strategies_turn_off_deepspeeds_second_division(stage: int) -> None:
    strategy = build_strategy(StrategyPlan(f"deepspeed_stage_{stage}", world_size=2, on_gpu=True, timeout_s=9))
    assert isinstance(strategy, DeepSpeedStrategyScaledOnce)
    assert issubclass(CPUDeepSpeedStrategyForTests, DeepSpeedStrategyScaledOnce)
