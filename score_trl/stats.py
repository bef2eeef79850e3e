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


def mcnemar_exact(incorrect_to_correct: int, correct_to_incorrect: int) -> float:
    """Two-sided exact McNemar test of one paired evaluation: under no effect each discordant problem flips either
    way with probability 1/2, so p = min(1, 2·P(X ≤ min(b, c))) with X ~ Binomial(b + c, 1/2)."""
    b, c = incorrect_to_correct, correct_to_incorrect
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def student_t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom (no SciPy needed): bisection on the CDF,
    which is 1/2 plus Simpson's rule on the density from 0."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x):
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x, steps=4000):
        h = x / steps
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return 0.5 + h / 3 * (density(0.0) + inner + density(x))

    if probability == 0.5:
        return 0.0
    if probability < 0.5:
        return -student_t_quantile(1 - probability, df)
    low, high = 0.0, 1.0
    while cdf(high) < probability:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < probability else (low, mid)
    return (low + high) / 2


def t_interval(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of per-seed values with its t-interval over seeds (n − 1 degrees of freedom): the between-seed
    variance is estimated from the seeds themselves, which is all a handful of seeds can support. Returns {"mean",
    "low", "high", "n"}; the interval is NaN with fewer than two values."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def stratified_bootstrap(per_seed: list[list[float]], draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean over seeds of the per-seed mean of per-problem values, with a 95% bootstrap interval that resamples the
    problems within each seed and keeps the seeds as they are: conditioned on the trained models, it says how
    precisely they were measured on this split, not what another training seed would give (`t_interval` does)."""
    import numpy as np

    values = [np.asarray(v, dtype=np.float64) for v in per_seed]
    rng = np.random.default_rng(seed)
    means = np.array([np.mean([v[rng.integers(len(v), size=len(v))].mean() for v in values]) for _ in range(draws)])
    low, high = np.quantile(means, [0.025, 0.975])
    return {"mean": float(np.mean([v.mean() for v in values])), "low": float(low), "high": float(high)}
