from __future__ import annotations

import pytest

from asyncrl.trainer.advantages import grpo_advantages


def test_zscore_by_hand() -> None:
    adv = grpo_advantages([1.0, 0.0, 0.0, 1.0])
    assert adv == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)  # mean .5, std .5
    adv = grpo_advantages([3.0, 1.0], scale_by_std=False)
    assert adv == [1.0, -1.0]


def test_zero_variance_group_is_none() -> None:
    assert grpo_advantages([0.5, 0.5, 0.5]) is None


def test_bad_groups() -> None:
    with pytest.raises(ValueError, match=">= 2"):
        grpo_advantages([1.0])
    with pytest.raises(ValueError, match="finite"):
        grpo_advantages([1.0, float("nan")])
