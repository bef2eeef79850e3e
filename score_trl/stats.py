"""Self-correction statistics: the paper's Acc@t1, Acc@t2, Δ, Δi→c, Δc→i (for K attempts), how much a later attempt
edits the one before, and their 95% intervals. One module for training logs, evaluation, reports and the reproduction.

Keys (documented once, in the README's metrics table):
- `accuracy_t{t}`: share of rows whose attempt t is correct (reward >= threshold);
- `delta`, `incorrect_to_correct`, `correct_to_incorrect`: between the first and the last attempt (the paper's
  Δ(t1,t2) for K = 2), so `delta == incorrect_to_correct - correct_to_incorrect`;
- `incorrect_to_correct_t{t}_t{u}`, `correct_to_incorrect_t{t}_t{u}`: each consecutive pair, when K > 2;
- `reward_delta`: mean r_K − r_1;
- `no_edit`, `text_changed` (= 1 − no_edit), `answer_changed`, `mean_edit_distance`: the last attempt against the
  one before it; `answer_changed` compares `rewards.final_answer` of the two, so a reworded attempt that keeps its
  number is a text change but not an answer change.
"""

import math

import torch


def transition_key(kind: str, t: int, u: int, num_attempts: int) -> str:
    """The key of a transition ("incorrect_to_correct" or "correct_to_incorrect") from attempt t to attempt u
    (1-based): the bare name for first → last, else suffixed `_t{t}_t{u}`."""
    return kind if (t, u) == (1, num_attempts) else f"{kind}_t{t}_t{u}"


def transition_pairs(num_attempts: int) -> list[tuple[int, int]]:
    """(t, u) pairs that get keys: first → last, then each consecutive pair when there are more than two attempts."""
    consecutive = [(t, t + 1) for t in range(1, num_attempts)] if num_attempts > 2 else []
    return [(1, num_attempts), *consecutive]


def as_reward_matrix(rewards) -> torch.Tensor:
    """(N, K) float64 rewards from a tensor or nested lists; None becomes NaN (unscorable)."""
    if isinstance(rewards, torch.Tensor):
        return rewards.double()
    return torch.tensor([[math.nan if r is None else float(r) for r in row] for row in rewards], dtype=torch.float64)


def self_correction_stats(rewards, threshold: float) -> dict[str, float]:
    """Statistics over the rows of (N, K) rewards [r1, ..., rK] where every attempt is scorable (not NaN / None).

    Shares are over the scorable rows; every value is NaN when there is none."""
    r = as_reward_matrix(rewards)
    r = r[~torch.isnan(r).any(dim=1)]
    num_attempts = r.size(1)
    correct = r >= threshold
    stats = {f"accuracy_t{t + 1}": correct[:, t].double().mean().item() for t in range(num_attempts)}
    stats["delta"] = (correct[:, -1].double() - correct[:, 0].double()).mean().item()
    for t, u in transition_pairs(num_attempts):
        before, after = correct[:, t - 1], correct[:, u - 1]
        stats[transition_key("incorrect_to_correct", t, u, num_attempts)] = (~before & after).double().mean().item()
        stats[transition_key("correct_to_incorrect", t, u, num_attempts)] = (before & ~after).double().mean().item()
    stats["reward_delta"] = (r[:, -1] - r[:, 0]).mean().item()
    return stats


def change_flags(previous: list[str], last: list[str], answer_of=None) -> tuple[list[bool], list[bool]]:
    """Per row: (the text changed, whitespace at the ends aside; the final answer changed), the last attempt against
    the one before it. `answer_of` reads a text's answer (default `rewards.final_answer`)."""
    if answer_of is None:
        from .rewards import final_answer as answer_of
    pairs = list(zip(previous, last, strict=True))
    return [a.strip() != b.strip() for a, b in pairs], [answer_of(a) != answer_of(b) for a, b in pairs]


def edit_stats(previous: list[str], last: list[str], answer_of=None) -> dict[str, float]:
    """How the last attempt differs from the one before: `no_edit` (the same text, whitespace aside), `text_changed`
    (1 − no_edit), `answer_changed` (a different final answer, see `change_flags`) and `mean_edit_distance`
    (characters). NaN without rows."""
    n = len(last)
    if n == 0:
        return dict.fromkeys(("no_edit", "text_changed", "answer_changed", "mean_edit_distance"), math.nan)
    text_changed, answer_changed = change_flags(previous, last, answer_of)
    return {
        "no_edit": 1 - sum(text_changed) / n,
        "text_changed": sum(text_changed) / n,
        "answer_changed": sum(answer_changed) / n,
        "mean_edit_distance": sum(edit_distance(a, b) for a, b in zip(previous, last, strict=True)) / n,
    }


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of a mean (used for Δ, a difference of paired proportions): the two-level
    bootstrap below with a single seed, so there is one resampling scheme."""
    if not values:
        return (math.nan, math.nan)
    result = two_level_bootstrap([values], draws=draws, seed=seed)
    return (result["low"], result["high"])


def two_level_bootstrap(per_seed: list[list[float]], draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean over seeds of the per-seed mean of per-problem values, with a 95% interval from a two-level bootstrap:
    each draw resamples the seeds with replacement, then the problems within each drawn seed. `per_seed[s][i]` is
    problem i's value under seed s (1/0 for "correct at t2", r2 − r1 for Δ, or a paired difference between two arms
    on the same problem and seed, which keeps the pairing). Returns {"mean", "low", "high", "seeds", "problems"}."""
    import numpy as np

    if not per_seed or any(len(values) == 0 for values in per_seed):
        raise ValueError("two_level_bootstrap needs at least one seed, each with at least one problem")
    values = [np.asarray(v, dtype=np.float64) for v in per_seed]
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for d in range(draws):
        seeds = rng.integers(len(values), size=len(values))
        means[d] = np.mean([values[s][rng.integers(len(values[s]), size=len(values[s]))].mean() for s in seeds])
    low, high = np.quantile(means, [0.025, 0.975])
    return {
        "mean": float(np.mean([v.mean() for v in values])),
        "low": float(low),
        "high": float(high),
        "seeds": len(values),
        "problems": int(sum(len(v) for v in values)),
    }
