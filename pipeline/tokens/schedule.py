"""Training-progress schedules of reduction settings."""
from __future__ import annotations

import math


def evit_keep_rate(step: int, total_steps: int, target: float, shrink_start: float, shrink_length: float) -> float:
    """EViT's keep-rate warm-up (youweiliang/evit ``adjust_keep_rate``), in steps instead of epochs.

    The official code keeps every token for ``shrink_start_epoch`` epochs, then lowers the rate from
    1.0 to ``base_keep_rate`` along half a cosine over ``shrink_epochs`` epochs, then holds it
    (its recipe: 10 and 100 of 300 epochs). Here both spans are fractions of ``total_steps``.

    Args:
        step: optimizer steps done; shrink_start, shrink_length: fractions of ``total_steps``.
    Returns:
        The keep rate for this step, in ``[target, 1]``.
    """
    start = shrink_start * total_steps
    length = shrink_length * total_steps
    if step < start:
        return 1.0
    if length <= 0 or step >= start + length:
        return target
    return target + (1.0 - target) * (math.cos((step - start) / length * math.pi) + 1) * 0.5
