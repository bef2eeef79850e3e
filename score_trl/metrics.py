"""RLOOTrainer's metrics computed per attempt (its keys, its reductions); the self-correction statistics are in
`score_trl.stats`."""

import torch
from trl.trainer.utils import nanstd


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
