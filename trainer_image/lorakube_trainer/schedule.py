"""The learning rate of each optimizer step: a pure function of the step's place in the whole run.

No scheduler object keeps state: the factor is computed from the absolute step (steps done before a
resume included), so a resumed run sets the same learning rate at every step as an uninterrupted
one without saving or restoring anything, whatever the optimizer's saved param groups say.
"""

from __future__ import annotations

import math


def lr_factor(kind: str, step_index: int, total_steps: int, warmup_steps: int) -> float:
    """The multiplier of the base learning rate for optimizer step `step_index` (0-based).

    The warm-up ramps linearly and never multiplies by 0 (step 0 gets 1/warmup, the last warm-up
    step the full rate), so no step of the run is wasted. After it, `constant` keeps the base rate,
    `linear` decays to 0 at the end of the run and `cosine` follows half a cosine down to 0.
    """
    if step_index < warmup_steps:
        return (step_index + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step_index - warmup_steps) / decay_steps, 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning rate scheduler {kind!r}")
