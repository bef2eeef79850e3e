"""Self-correction statistics from per-attempt rewards (the paper's Acc@t1, Acc@t2, Δ, Δi→c, Δc→i, for K attempts)."""

import torch


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
