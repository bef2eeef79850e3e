"""Self-correction statistics from per-attempt rewards (the paper's Acc@t1, Acc@t2, Δ, Δi→c, Δc→i)."""

import torch


def self_correction_stats(rewards: torch.Tensor, threshold: float) -> dict[str, float]:
    """Statistics over the rows of (N, 2) rewards [r1, r2] where both attempts are scorable (not NaN).

    An attempt is correct when its reward is >= threshold. Shares are over all scorable rows, so
    `delta == incorrect_to_correct - correct_to_incorrect` exactly. Returns NaN values when no row is scorable.
    """
    scorable = ~torch.isnan(rewards).any(dim=1)
    r = rewards[scorable].double()
    if r.numel() == 0:
        nan = float("nan")
        return dict.fromkeys(
            ["accuracy_t1", "accuracy_t2", "delta", "incorrect_to_correct", "correct_to_incorrect", "reward_delta"],
            nan,
        )
    correct = r >= threshold
    c1, c2 = correct[:, 0], correct[:, 1]
    return {
        "accuracy_t1": c1.double().mean().item(),
        "accuracy_t2": c2.double().mean().item(),
        "delta": (c2.double() - c1.double()).mean().item(),
        "incorrect_to_correct": (~c1 & c2).double().mean().item(),
        "correct_to_incorrect": (c1 & ~c2).double().mean().item(),
        "reward_delta": (r[:, 1] - r[:, 0]).mean().item(),
    }
