"""Self-correction statistics from per-attempt rewards (the paper's Acc@t1, Acc@t2, Δ, Δi→c, Δc→i, for K attempts)."""

import torch
from trl.trainer.utils import nanstd


def self_correction_stats(rewards: torch.Tensor, threshold: float) -> dict[str, float]:
    """Statistics over the rows of (N, K) rewards [r1, ..., rK] where every attempt is scorable (not NaN).

    An attempt is correct when its reward is >= threshold. `accuracy_t{t}` for every attempt; `delta`,
    `incorrect_to_correct` and `correct_to_incorrect` compare the first and the last attempt (the paper's Δ(t1,t2)
    for K = 2), so `delta == incorrect_to_correct - correct_to_incorrect` exactly; `reward_delta` is the mean
    r_K - r_1. With K > 2, every consecutive pair also gets `incorrect_to_correct_t{t}_t{t+1}` and
    `correct_to_incorrect_t{t}_t{t+1}`. Shares are over the scorable rows; NaN values when there is none.
    """
    num_attempts = rewards.size(1)
    scorable = ~torch.isnan(rewards).any(dim=1)
    r = rewards[scorable].double()
    correct = r >= threshold
    pairs = [(0, num_attempts - 1)] + ([(t, t + 1) for t in range(num_attempts - 1)] if num_attempts > 2 else [])
    stats = {f"accuracy_t{t + 1}": correct[:, t].double().mean().item() for t in range(num_attempts)}
    stats["delta"] = (correct[:, -1].double() - correct[:, 0].double()).mean().item()
    for k, (a, b) in enumerate(pairs):
        suffix = "" if k == 0 else f"_t{a + 1}_t{b + 1}"
        stats[f"incorrect_to_correct{suffix}"] = (~correct[:, a] & correct[:, b]).double().mean().item()
        stats[f"correct_to_incorrect{suffix}"] = (correct[:, a] & ~correct[:, b]).double().mean().item()
    stats["reward_delta"] = (r[:, -1] - r[:, 0]).mean().item()
    return stats  # the mean of no rows is NaN, so every value is NaN when no row is scorable


# RLOOTrainer's metric keys, computed per attempt. The trainer logs each under `turn{t}/...` and, for the last
# attempt, also under RLOO's own name, so dashboards built for RLOO read the final answer's numbers.


def length_stats(lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """RLOO's `completions/*` values for one attempt's (N,) completion lengths and (N,) truncation flags. As RLOO,
    the terminated-length statistics are 0 when every completion was truncated."""
    lengths = lengths.float()
    terminated = lengths[~truncated.bool()]
    if terminated.numel() == 0:
        terminated = torch.zeros(1, device=lengths.device)
    return {
        "mean_length": lengths.mean().item(),
        "min_length": lengths.min().item(),
        "max_length": lengths.max().item(),
        "clipped_ratio": truncated.float().mean().item(),
        "mean_terminated_length": terminated.mean().item(),
        "min_terminated_length": terminated.min().item(),
        "max_terminated_length": terminated.max().item(),
    }


def reward_stats(rewards: torch.Tensor, num_generations: int) -> dict[str, float]:
    """RLOO's `reward`, `reward_std` and `frac_reward_zero_std` for one attempt's (N,) rewards (NaN: unscorable),
    N a multiple of `num_generations` (consecutive rows share a prompt)."""
    group_std = nanstd(rewards.view(-1, num_generations), dim=1)
    return {
        "reward": torch.nanmean(rewards).item(),
        "reward_std": nanstd(rewards).item(),
        "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item(),
    }


def clip_stats(low: torch.Tensor, high: torch.Tensor) -> dict[str, float]:
    """RLOO's `clip_ratio/*` over every (row, attempt) sequence: (N, K) flags of sequences whose ratio was clipped
    below (with a negative advantage) or above (with a positive one)."""
    return {
        "low_mean": low.mean().item(),
        "low_min": low.min().item(),
        "high_mean": high.mean().item(),
        "high_max": high.max().item(),
        "region_mean": (low + high).clamp(max=1).mean().item(),
    }
