"""Group-relative advantages (GRPO).

Invariant: advantages are the z-score of the rewards within one group
(``(r - mean) / (std + eps)``, population std); a group whose rewards all agree carries no
learning signal and yields ``None`` (the caller drops and counts it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["grpo_advantages"]


def grpo_advantages(
    rewards_G: Sequence[float], *, eps: float = 1e-6, scale_by_std: bool = True
) -> list[float] | None:
    """Z-scored group advantages, or None for a zero-variance group."""
    if len(rewards_G) < 2:
        raise ValueError(f"a GRPO group needs >= 2 samples, got {len(rewards_G)}")
    if not all(math.isfinite(r) for r in rewards_G):
        raise ValueError(f"rewards must be finite, got {list(rewards_G)}")
    mean = sum(rewards_G) / len(rewards_G)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards_G) / len(rewards_G))
    if std < eps:
        return None
    denom = std + eps if scale_by_std else 1.0
    return [(r - mean) / denom for r in rewards_G]
