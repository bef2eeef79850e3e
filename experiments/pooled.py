"""Statistics of the reproduction over seeds: per-problem values read from each arm's `records.jsonl`, the per-seed
table first (with exact McNemar tests and the tokens each arm sampled), then the values over seeds with a t-interval
over seeds and a problem bootstrap with the models fixed (`score_trl.stats`), paired differences between arms (same
seed, same problem), and the first round's targets, each said met or missed.

The base arm is not trained, so it has one set of records; it is paired with every seed of the other arms.
"""

import json
import math
from pathlib import Path

from score_trl.config import CORRECT_THRESHOLD as THRESHOLD
from score_trl.evaluation import read_records as read_jsonl
from score_trl.rewards import numeric_reward
from score_trl.scoring import graded_answer
from score_trl.stats import change_flags, mcnemar_exact, stratified_bootstrap, t_interval


# "answer changed" reads what the arithmetic task's reward grades: the last number
GRADED_ANSWER = graded_answer([numeric_reward])

# key -> (label, per-problem value from (correct at t1, correct at t2))
OUTCOMES = {
    "accuracy_t1": ("Acc@t1", lambda c1, c2: float(c1)),
    "accuracy_t2": ("Acc@t2", lambda c1, c2: float(c2)),
    "delta": ("Δ(t1,t2)", lambda c1, c2: float(c2) - float(c1)),
    "incorrect_to_correct": ("Δi→c", lambda c1, c2: float(not c1 and c2)),
    "correct_to_incorrect": ("Δc→i", lambda c1, c2: float(c1 and not c2)),
}
CHANGES = {"text_changed": "text changed", "answer_changed": "answer changed"}
LABELS = {key: label for key, (label, _) in OUTCOMES.items()} | CHANGES


def read_records(path: str | Path) -> list[dict]:
    """An evaluation's records, one per problem, in problem order."""
    return sorted(read_jsonl(path, repair=False), key=lambda r: (r["index"], r["sample"]))


def problem_values(records: list[dict], key: str) -> list[float]:
    """Per problem, the value whose mean is the metric `key` (an `OUTCOMES` or `CHANGES` key)."""
    if key in CHANGES:
        first, second = [r["attempt_1"] for r in records], [r["attempt_2"] for r in records]
        text, answer = change_flags(first, second, GRADED_ANSWER)
        return [float(v) for v in (text if key == "text_changed" else answer)]
    value = OUTCOMES[key][1]
    return [value(r["reward_1"] >= THRESHOLD, r["reward_2"] >= THRESHOLD) for r in records]


def per_seed_values(runs: dict[str, dict[int, list[dict]]], arm: str, key: str, seeds: list[int]) -> list[list[float]]:
    """problem_values of `arm` under each seed; an arm with one run (base) stands for every seed."""
    by_seed = runs[arm]
    return [problem_values(by_seed[seed] if seed in by_seed else by_seed[None], key) for seed in seeds]


def over_seeds(per_seed: list[list[float]], draws: int = 2000, one_run: bool = False) -> dict:
    """Per-problem values of each seed -> {"mean", "low", "high"}: the mean of the per-seed means with a 95%
    t-interval over the seeds (what another training seed could give), and "fixed": a 95% bootstrap over problems
    within each seed (`stats.stratified_bootstrap`), conditioned on these trained models. `one_run`: the values are
    one run's standing in for every seed (the base model), one sample, so the t-interval is NaN (as with one seed)."""
    per_seed = per_seed[:1] if one_run else per_seed
    return t_interval([sum(v) / len(v) for v in per_seed]) | {"fixed": stratified_bootstrap(per_seed, draws=draws)}


def paired_difference(runs, a: str, b: str, key: str, seeds: list[int], draws: int = 2000) -> dict:
    """metric(a) − metric(b) over seeds, each problem paired with itself under the same seed (`over_seeds`)."""
    first, second = per_seed_values(runs, a, key, seeds), per_seed_values(runs, b, key, seeds)
    differences = []
    for x, y in zip(first, second, strict=True):
        if len(x) != len(y):
            raise ValueError(f"{a} and {b} have {len(x)} and {len(y)} problems: pair only evaluations of one split")
        differences.append([u - v for u, v in zip(x, y, strict=True)])
    return over_seeds(differences, draws, one_run=None in runs[a] and None in runs[b])


def seeds_of(runs: dict[str, dict[int, list[dict]]]) -> list[int]:
    """Seeds run by every trained arm present (the ones a pooled comparison can use)."""
    trained = [set(by_seed) for by_seed in runs.values() if None not in by_seed]
    return sorted(set.intersection(*trained)) if trained else []


def pooled(runs, arms: list[str], keys: list[str], seeds: list[int], draws: int = 2000) -> dict[str, dict]:
    """{arm: {key: over_seeds result}} over `seeds`."""
    return {
        arm: {key: over_seeds(per_seed_values(runs, arm, key, seeds), draws, None in runs[arm]) for key in keys}
        for arm in arms
    }


def fmt(result: dict, signed: bool = True, which: str = "t") -> str:
    """ "+1.3 [-0.4, +2.9]" in points (percent), the t-interval over seeds (`which="fixed"`: the problem bootstrap
    with the models fixed); the mean alone where there is no interval (one run); unsigned for shares."""
    f = "{:+.1f}" if signed else "{:.1f}"
    interval = result if which == "t" else result["fixed"]
    if math.isnan(interval["low"]):
        return f.format(100 * result["mean"])
    return f"{f.format(100 * result['mean'])} [{f.format(100 * interval['low'])}, {f.format(100 * interval['high'])}]"


def verdict(result: dict) -> str:
    """Where a difference's t-interval over seeds lies: above 0, below 0, or including 0 (or one run: no interval)."""
    if math.isnan(result["low"]):
        return "one run: no interval over seeds"
    if result["low"] > 0:
        return "above 0"
    return "below 0" if result["high"] < 0 else "includes 0"


def training_cost(folder: Path) -> dict | None:
    """Tokens an arm sampled and prompts it saw in training, from its log_history.json and run.json: per logged step,
    the rows times the mean completion length of each attempt (SCoRe's `turn{t}/completions/mean_length`, RLOO's
    `completions/mean_length`), and rows / num_generations prompts. None for the untrained base."""
    history_file, run_file = Path(folder) / "log_history.json", Path(folder) / "run.json"
    if not history_file.is_file() or not run_file.is_file():
        return None
    run = json.loads(run_file.read_text())
    settings = run["settings"]
    if "training" in settings:  # the trainer's own config
        training = settings["training"]
        rows, generations = training["per_device_train_batch_size"], training["num_generations"]
    else:  # run.json before the restructuring (41c9dc4): prompts per SCoRe step, doubled for the RLOO arms
        single_turn = run["arm"] in ("rloo", "rloo_2n")
        generations = settings["num_generations"]
        rows = settings["prompts_per_step"] * generations * (2 if single_turn else 1)
    steps = [h for h in json.loads(history_file.read_text()) if "loss" in h]
    sampled = 0.0
    for h in steps:
        attempts = [h[k] for k in sorted(h) if k.startswith("turn") and k.endswith("/completions/mean_length")]
        sampled += rows * sum(attempts or [h["completions/mean_length"]])
    return {"sampled_tokens": round(sampled), "prompts": len(steps) * rows // generations, "steps": len(steps)}


def load_runs(output_dir: str | Path, arms: list[str], subdir: str = "") -> dict[str, dict[int, list[dict]]]:
    """{arm: {seed: records}} from output_dir/seed*/<arm>/<subdir>/records.jsonl (complete evaluations only, i.e.
    with a summary.json beside them); base from output_dir/base/<subdir> under the key None."""
    output_dir = Path(output_dir)
    runs: dict[str, dict] = {}
    for arm in arms:
        if arm == "base":
            folders = {None: output_dir / "base" / subdir}
        else:
            folders = {int(p.name[4:]): p / arm / subdir for p in sorted(output_dir.glob("seed[0-9]*"))}
        found = {s: read_records(f / "records.jsonl") for s, f in folders.items() if (f / "summary.json").is_file()}
        if found:
            runs[arm] = found
    return runs


SIGNED = {"delta"}  # keys shown with a sign (a difference of two attempts); shares are unsigned
# Paired comparisons the reproduction reports: (metric, arm a, arm b), read as metric(a) − metric(b)
COMPARISONS = [
    ("delta", "score", "rloo"),
    ("delta", "score", "score_alpha0"),
    ("delta", "score", "score_no_stage1"),
    ("delta", "score", "base"),
    ("accuracy_t2", "score", "rloo"),
    ("accuracy_t1", "rloo_then_score", "rloo_2n"),
    ("accuracy_t2", "rloo_then_score", "rloo_2n"),
    ("delta", "rloo_then_score", "rloo_2n"),
]


def results_markdown(output_dir: str | Path, arms: list[str], split: str, draws: int = 2000) -> str:
    """results.md: each seed first (the headline: per-seed values, exact McNemar tests, the tokens and prompts each
    arm trained on), then the values over seeds with both intervals, the paired differences, the targets and, when
    evaluated, the transfer set, from the records and logs the runs wrote in output_dir."""
    runs = load_runs(output_dir, arms)
    present = [arm for arm in arms if arm in runs]
    seeds = seeds_of(runs)
    if not present or not seeds and present != ["base"]:
        return f"# Self-correction on generated arithmetic ({split} split)\n\nNo complete evaluation yet.\n"
    seeds = seeds or [None]
    keys = [*OUTCOMES, *CHANGES]
    lines = [
        f"# Self-correction on generated arithmetic ({split} split)",
        "",
        f"Seeds: {seeds} (those every trained arm has finished). Greedy, two attempts, percentages. Each seed is one "
        "training run; the base model is not trained and has one evaluation, which stands beside every seed.",
        "",
        "Two intervals, both 95%, answer different questions. *Over seeds*: a t-interval over the per-seed values "
        "(n − 1 degrees of freedom): what another training seed could give; with three seeds it is wide, and it is "
        "the one the targets use. *Models fixed*: a bootstrap over problems within each seed, paired by problem: "
        "how precisely these trained models were measured on this split, conditioned on them.",
        "",
        "## Each seed",
        "",
        "i→c and c→i are counts of problems; *McNemar p*: exact two-sided test of i→c against c→i (`stats."
        "mcnemar_exact`). Sampled tokens: what the arm generated in training, from its log_history.json (rows × "
        "mean completion length per attempt, summed over steps); prompts: distinct prompts per step × steps.",
        "",
        "| arm | seed | " + " | ".join(LABELS[k] for k in keys) + " | i→c | c→i | McNemar p | sampled tokens | "
        "prompts |",
        "|---|---|" + "---|" * (len(keys) + 5),
    ]
    for arm in present:
        for seed, records in sorted(runs[arm].items(), key=lambda item: -1 if item[0] is None else item[0]):
            cells = [f"{100 * sum(v) / len(v):.1f}" for v in (problem_values(records, k) for k in keys)]
            i2c = int(sum(problem_values(records, "incorrect_to_correct")))
            c2i = int(sum(problem_values(records, "correct_to_incorrect")))
            folder = Path(output_dir) / ("base" if seed is None else f"seed{seed}/{arm}")
            cost = training_cost(folder)
            spent = [f"{cost['sampled_tokens']:,}", str(cost["prompts"])] if cost else ["–", "–"]
            cells += [str(i2c), str(c2i), f"{mcnemar_exact(i2c, c2i):.3g}", *spent]
            lines.append(f"| {arm} | {'–' if seed is None else seed} | " + " | ".join(cells) + " |")
    table = pooled(runs, present, keys, seeds, draws)
    lines += [
        "",
        "## Over seeds",
        "",
        "Mean of the per-seed values [95% t-interval over seeds]; the base model has one run, so no interval. Δ also "
        "with the models fixed.",
        "",
        "| arm | " + " | ".join(LABELS[k] for k in keys) + " | Δ, models fixed |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    for arm in present:
        cells = [fmt(table[arm][k], signed=k in SIGNED) for k in keys] + [fmt(table[arm]["delta"], which="fixed")]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    differences = [
        (key, a, b, paired_difference(runs, a, b, key, seeds, draws))
        for key, a, b in COMPARISONS
        if a in runs and b in runs
    ]
    if differences:
        lines += ["", "## Paired differences (points)", "",
                  "| difference | over seeds | interval over seeds | models fixed |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {LABELS[k]}({a}) − {LABELS[k]}({b}) | {fmt(r)} | {verdict(r)} | {fmt(r, which='fixed')} |"
                  for k, a, b, r in differences]  # fmt: skip
    lines += ["", "## Targets", "", *targets(runs, table, seeds, draws)]
    transfer = load_runs(output_dir, arms, subdir="transfer")
    if transfer and seeds_of(transfer):
        lines += ["", *transfer_section(runs, transfer, seeds, draws)]
    return "\n".join(lines) + "\n"


def targets(runs, table, seeds, draws) -> list[str]:
    """The first round's targets, each with its numbers and said met or missed, on the t-intervals over seeds (an
    interval needs two seeds or more: with one, a target that asks for an interval is missed)."""
    out = []
    if "score" in table:
        delta = table["score"]["delta"]
        met = "met" if delta["low"] > 0 else "missed"
        out.append(f"- SCoRe Δ > 0 with its interval above 0: **{met}**, Δ = {fmt(delta)}.")
        i2c, c2i = table["score"]["incorrect_to_correct"], table["score"]["correct_to_incorrect"]
        met = "met" if i2c["mean"] > c2i["mean"] and delta["low"] > 0 else "missed"
        out.append(
            f"- SCoRe Δi→c > Δc→i (their difference is Δ, so shown only when Δ's interval is above 0): **{met}**, "
            f"{fmt(i2c, False)} vs {fmt(c2i, False)}."
        )
        others = [arm for arm in table if arm not in ("score",)]
        if others:
            best = max(others, key=lambda arm: table[arm]["accuracy_t2"]["mean"])
            result = paired_difference(runs, "score", best, "accuracy_t2", seeds, draws)
            met = "met" if result["high"] >= 0 and result["mean"] >= 0 else "missed"
            out.append(
                f"- SCoRe's Acc@t2 at least the best other arm's ({best}, {fmt(table[best]['accuracy_t2'], False)}): "
                f"**{met}**, difference {fmt(result)} ({verdict(result)})."
            )
    if "rloo_then_score" in table and "rloo_2n" in table:
        result = paired_difference(runs, "rloo_then_score", "rloo_2n", "accuracy_t2", seeds, draws)
        met = "met" if result["low"] > 0 else "missed"
        out.append(
            f"- RLOO→SCoRe's Acc@t2 above RLOO 2N's at equal sampled tokens: **{met}**, difference {fmt(result)} "
            f"({verdict(result)})."
        )
    return out or ["- (no trained SCoRe arm evaluated yet)"]


def transfer_section(runs, transfer, seeds, draws) -> list[str]:
    """The transfer set: each arm's pooled values there, and whether its gain over the base model (Acc@t1) and its Δ
    carry over from the test split."""
    present = [arm for arm in runs if arm in transfer]
    lines = [
        "## Transfer: the test facts asked in phrasings the generator never uses (`experiments.transfer`)",
        "",
        "| arm | Acc@t1 | Acc@t2 | Δ (transfer) | Δ (test) | Acc@t1 − base (transfer) | Acc@t1 − base (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    table = pooled(transfer, present, ["accuracy_t1", "accuracy_t2", "delta"], seeds, draws)
    test = pooled(runs, present, ["delta"], seeds, draws)
    for arm in present:
        gains = ["–", "–"]
        if arm != "base" and "base" in transfer:
            gains = [fmt(paired_difference(r, arm, "base", "accuracy_t1", seeds, draws)) for r in (transfer, runs)]
        row = [fmt(table[arm]["accuracy_t1"], False), fmt(table[arm]["accuracy_t2"], False)]
        row += [fmt(table[arm]["delta"]), fmt(test[arm]["delta"]), *gains]
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return lines
