"""Pooled reproduction statistics over seeds: per-problem values, the two-level bootstrap, paired differences and the
results page, on hand-made records whose answers are known."""

import json
import math

import pytest

from experiments.pooled import (
    load_runs,
    over_seeds,
    paired_difference,
    problem_values,
    results_markdown,
    seeds_of,
    verdict,
)
from score_trl.stats import two_level_bootstrap


def records(pairs, texts=None):
    """Records from (r1, r2) pairs; texts default to the reward written out (so a changed reward changes the text)."""
    texts = texts or [(f"The answer is {r1}.", f"The answer is {r2}.") for r1, r2 in pairs]
    return [
        {"index": i, "sample": 0, "reward_1": r1, "reward_2": r2, "attempt_1": a, "attempt_2": b}
        for i, ((r1, r2), (a, b)) in enumerate(zip(pairs, texts, strict=True))
    ]


def test_problem_values_by_hand():
    rows = records([(0, 1), (1, 0), (1, 1), (0, 0)], texts=[("a 3", "b 4"), ("x 5", "x 6"), ("7", "7"), ("8", "8 ")])
    assert problem_values(rows, "accuracy_t1") == [0, 1, 1, 0]
    assert problem_values(rows, "accuracy_t2") == [1, 0, 1, 0]
    assert problem_values(rows, "delta") == [1, -1, 0, 0]
    assert problem_values(rows, "incorrect_to_correct") == [1, 0, 0, 0]
    assert problem_values(rows, "correct_to_incorrect") == [0, 1, 0, 0]
    assert problem_values(rows, "text_changed") == [1, 1, 0, 0]
    assert problem_values(rows, "answer_changed") == [1, 1, 0, 0]


def test_two_level_bootstrap_by_hand():
    # constant within and across seeds: no spread
    assert two_level_bootstrap([[0.5] * 10] * 3) == {"mean": 0.5, "low": 0.5, "high": 0.5, "seeds": 3, "problems": 30}
    # constant within each seed, seeds at 0, 1/2, 1: the spread is the seeds' alone. The mean of three seeds drawn
    # with replacement is 0 with probability 1/27 (3.7% > 2.5%), so the interval is [0, 1]
    result = two_level_bootstrap([[0.0] * 50, [0.5] * 50, [1.0] * 50], draws=4000)
    assert (result["mean"], result["low"], result["high"]) == (0.5, 0.0, 1.0)
    # one seed: the problem-level percentile bootstrap of a mean (half ones: ±1.96·sqrt(.25/400) ≈ ±0.049)
    one = two_level_bootstrap([[1.0, 0.0] * 200], draws=4000)
    assert one["low"] == pytest.approx(0.451, abs=0.012) and one["high"] == pytest.approx(0.549, abs=0.012)
    with pytest.raises(ValueError, match="at least one seed"):
        two_level_bootstrap([[1.0], []])


def test_paired_difference_keeps_the_pairing():
    # arm a is arm b plus one extra correct problem per seed: every paired difference is 0 except one problem, so the
    # problem-level interval is tight; unpaired, the accuracies' own spread (~±5 points) would swamp the 0.5 points
    base = [(r, r) for r in [1.0, 0.0] * 100]
    runs = {"a": {0: records([(1.0, 1.0), (1.0, 1.0)] + base[2:])}, "b": {0: records(base)}}  # a: problem 1 right
    result = paired_difference(runs, "a", "b", "accuracy_t2", [0], draws=2000)
    assert result["mean"] == pytest.approx(1 / 200)
    assert 0.0 <= result["fixed"]["low"] <= result["fixed"]["high"] <= 0.015
    assert math.isnan(result["low"]) and verdict(result) == "one run: no interval over seeds"  # one seed
    assert verdict({"low": -0.2, "high": -0.1}) == "below 0" and verdict({"low": 0.1, "high": 0.2}) == "above 0"
    runs["c"] = {0: records(base[:10])}
    with pytest.raises(ValueError, match="pair only evaluations of one split"):
        paired_difference(runs, "a", "c", "delta", [0])


def test_over_seeds_is_a_t_interval_and_the_base_counts_once():
    # per-seed means 0.25, 0.30, 0.35: mean 0.30, sd 0.05, half-width t(2) 4.303 * 0.05 / sqrt(3) = 0.1242
    per_seed = [[1.0] * n + [0.0] * (40 - n) for n in (10, 12, 14)]
    result = over_seeds(per_seed, draws=500)
    assert (result["mean"], result["low"], result["high"]) == pytest.approx((0.30, 0.1758, 0.4242), abs=1e-4)
    assert result["fixed"]["low"] < 0.30 < result["fixed"]["high"]
    # one run standing in for three seeds (the base model) is one sample, not three agreeing seeds
    once = over_seeds([[1.0, 0.0] * 20] * 3, draws=500, one_run=True)
    assert once["mean"] == 0.5 and math.isnan(once["low"])
    agreeing = over_seeds([[1.0, 0.0] * 20] * 3, draws=500)  # three trained seeds that happen to agree
    assert (agreeing["low"], agreeing["high"]) == (0.5, 0.5)


def write_arm(folder, rows):
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text("{}")


def test_results_page_from_files(tmp_path):
    # 40 problems. base: 10 right at both attempts; score: seeds 0, 1, 2 correct 10, 12 and 14 more at t2
    write_arm(tmp_path / "base", records([(1, 1)] * 10 + [(0, 0)] * 30))
    for seed, n in enumerate((10, 12, 14)):
        write_arm(tmp_path / f"seed{seed}" / "score", records([(1, 1)] * 10 + [(0, 1)] * n + [(0, 0)] * (30 - n)))
    (tmp_path / "seed3" / "score").mkdir(parents=True)  # unfinished: no summary.json, not pooled
    runs = load_runs(tmp_path, ["base", "score", "rloo"])
    assert set(runs) == {"base", "score"} and set(runs["score"]) == {0, 1, 2} and seeds_of(runs) == [0, 1, 2]
    page = results_markdown(tmp_path, ["base", "score", "rloo"], "test", draws=500)
    assert "Seeds: [0, 1, 2]" in page and page.index("## Each seed") < page.index("## Over seeds")
    # each seed: values, the counts, exact McNemar (10 one-way flips: 2 / 2^10), no training log here
    assert "| score | 0 | 25.0 | 50.0 | 25.0 | 25.0 | 0.0 | 25.0 | 25.0 | 10 | 0 | 0.00195 | – | – |" in page
    assert "| base | – | 25.0 | 25.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0 | 0 | 1 | – | – |" in page
    # over seeds: Δ per seed 25, 30, 35 -> +30.0 [+17.6, +42.4]; the base model has one run, so no interval
    row = next(line for line in page.splitlines() if line.startswith("| score | 25.0 [25.0, 25.0] |"))
    assert "| +30.0 [+17.6, +42.4] |" in row
    assert "| base | 25.0 | 25.0 | +0.0 |" in page
    assert "| Δ(t1,t2)(score) − Δ(t1,t2)(base) | +30.0 [+17.6, +42.4] | above 0 |" in page
    target = next(line for line in page.splitlines() if line.startswith("- SCoRe Δ > 0"))
    assert "**met**" in target and "+30.0 [+17.6, +42.4]" in target
    best = next(line for line in page.splitlines() if line.startswith("- SCoRe's Acc@t2"))
    assert "(base, 25.0)" in best and "**met**" in best


def test_budget_report_applies_the_learning_rule_per_checkpoint(tmp_path):
    """The feedback control's budget rule on hand-made validation records: i→c > c→i with exact McNemar p < 0.05, and
    c→i no higher than the base model's with the verdict (2 here)."""
    from experiments.feedback_control import budget_report

    def write(folder, i2c, c2i, same=10):
        pairs = [(0, 1)] * i2c + [(1, 0)] * c2i + [(1, 1)] * same + [(0, 0)] * same
        rows = records(pairs)
        if "verdict" in folder.name:  # the verdict the correction turn carried, as the evaluation records it
            rows = [dict(r, feedback_1=f"Your answer is {'correct' if r['reward_1'] else 'incorrect'}.") for r in rows]
        folder.mkdir(parents=True)
        (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(tmp_path / "base", 0, 0)
    write(tmp_path / "base" / "feedback_verdict", 0, 2)
    # told "incorrect": the i→c rows and the 10 wrong twice, of which the i→c rows changed their answer
    # p = 2 / 2**6 = 0.031 (learns); 2 / 2**5 = 0.0625 (no); 2 * 576 / 2**15 = 0.035 but 3 c→i > 2 (no)
    for step, (i2c, c2i) in {32: (6, 0), 64: (5, 0), 128: (12, 3)}.items():
        write(tmp_path / "checkpoints" / f"step{step}" / "verdict", i2c, c2i)
        write(tmp_path / "checkpoints" / f"step{step}" / "none", 0, 0)
    rows = {tuple(line.split(" | ")[:2]): line for line in budget_report(tmp_path).splitlines()[2:]}
    assert rows[("| step 32", "verdict")].endswith("| 6 | 0 | 0.0312 | 61.5 | 6 of 16 | yes |")
    assert rows[("| step 64", "verdict")].endswith("| 5 | 0 | 0.0625 | 60.0 | 5 of 15 | no |")
    assert rows[("| step 128", "verdict")].endswith("| 12 | 3 | 0.0352 | 62.9 | 12 of 22 | no |")
    assert rows[("| step 32", "none")].endswith("| – | – | – |") and ("| base", "verdict") in rows
    assert [key[0] for key in rows] == ["| base"] * 2 + ["| step 32"] * 2 + ["| step 64"] * 2 + ["| step 128"] * 2
