"""RLOO's metric values computed per attempt (score_trl.metrics), by hand."""

import math

import pytest
import torch

from score_trl.metrics import clip_stats, length_stats, reward_stats


def test_rloo_metric_helpers_by_hand():
    stats = length_stats(torch.tensor([4, 8, 2, 8]), torch.tensor([False, True, False, True]))
    assert stats == {
        "mean_length": 5.5, "min_length": 2.0, "max_length": 8.0, "clipped_ratio": 0.5,
        "mean_terminated_length": 3.0, "min_terminated_length": 2.0, "max_terminated_length": 4.0,
    }  # fmt: skip
    assert length_stats(torch.tensor([8, 8]), torch.tensor([True, True]))["max_terminated_length"] == 0.0  # as RLOO

    # Two prompts x 2 generations: group [1, 1] has zero std, group [0, 1] does not; NaN (unscorable) is left out
    stats = reward_stats(torch.tensor([1.0, 1.0, 0.0, 1.0]), num_generations=2)
    assert stats["reward"] == 0.75 and stats["frac_reward_zero_std"] == 0.5
    assert math.isclose(stats["reward_std"], 0.5)  # sample std of [1, 1, 0, 1]
    assert reward_stats(torch.tensor([1.0, float("nan"), 0.0, 0.0]), 2)["reward"] == pytest.approx(1 / 3)

    low = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    high = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert clip_stats(low, high) == {
        "low_mean": 0.25, "low_min": 0.0, "high_mean": 0.5, "high_max": 1.0, "region_mean": 0.75,
    }  # fmt: skip
