"""Self-correction statistics by hand: accuracies, transitions and their keys, edits, intervals."""

import math

import pytest
import torch

from score_trl.stats import (
    bootstrap_interval,
    change_flags,
    edit_distance,
    edit_stats,
    mcnemar_exact,
    self_correction_stats,
    stratified_bootstrap,
    student_t_quantile,
    t_interval,
    transition_key,
    transition_pairs,
    wilson_interval,
)


nan = math.nan
# [r1, r2] for one prompt x four first attempts, and [r1, r2, r3]
REWARDS = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
REWARDS_3 = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def test_self_correction_stats_by_hand():
    rewards = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0], [nan, 1.0]])
    s = self_correction_stats(rewards, threshold=0.5)
    # 5 scorable rows: t1 correct {1,2}, t2 correct {0,2,4}; i->c {0,4}; c->i {1}
    assert s["accuracy_t1"] == pytest.approx(2 / 5)
    assert s["accuracy_t2"] == pytest.approx(3 / 5)
    assert s["incorrect_to_correct"] == pytest.approx(2 / 5)
    assert s["correct_to_incorrect"] == pytest.approx(1 / 5)
    assert s["delta"] == pytest.approx(s["incorrect_to_correct"] - s["correct_to_incorrect"])
    assert s["reward_delta"] == pytest.approx(1 / 5)
    assert all(math.isnan(v) for v in self_correction_stats(torch.full((2, 2), nan), 0.5).values())


def test_self_correction_stats_three_attempts():
    s = self_correction_stats(REWARDS_3, threshold=0.5)
    assert [s["accuracy_t1"], s["accuracy_t2"], s["accuracy_t3"]] == pytest.approx([0.5, 0.5, 0.5])
    # t1 -> t3: rows 0 (i->c), 3 (c->i)
    assert (s["incorrect_to_correct"], s["correct_to_incorrect"], s["delta"]) == pytest.approx((0.25, 0.25, 0.0))
    # t1 -> t2: i->c row 0, c->i row 1; t2 -> t3: i->c row 1, c->i row 3
    assert (s["incorrect_to_correct_t1_t2"], s["correct_to_incorrect_t1_t2"]) == pytest.approx((0.25, 0.25))
    assert (s["incorrect_to_correct_t2_t3"], s["correct_to_incorrect_t2_t3"]) == pytest.approx((0.25, 0.25))
    assert s["reward_delta"] == pytest.approx(0.0)
    assert "incorrect_to_correct_t1_t2" not in self_correction_stats(REWARDS, threshold=0.5)


def test_lists_with_none_are_unscorable_rows():
    assert self_correction_stats([[0.0, 1.0], [None, 1.0], [1.0, 1.0]], 0.5) == self_correction_stats(
        torch.tensor([[0.0, 1.0], [1.0, 1.0]]), 0.5
    )


def test_one_key_scheme_for_transitions():
    assert transition_pairs(2) == [(1, 2)] and transition_pairs(3) == [(1, 3), (1, 2), (2, 3)]
    assert transition_key("incorrect_to_correct", 1, 2, num_attempts=2) == "incorrect_to_correct"
    assert transition_key("correct_to_incorrect", 1, 3, num_attempts=3) == "correct_to_incorrect"
    assert transition_key("incorrect_to_correct", 2, 3, num_attempts=3) == "incorrect_to_correct_t2_t3"
    keys = set(self_correction_stats(REWARDS_3, 0.5))
    assert {transition_key(k, t, u, 3) for t, u in transition_pairs(3) for k in ("incorrect_to_correct",
            "correct_to_incorrect")} <= keys  # fmt: skip


def test_edit_stats_by_hand():
    assert edit_stats(["same ", "abc", "x"], ["same", "abd", "xyz"]) == {
        "no_edit": pytest.approx(1 / 3),
        "text_changed": pytest.approx(2 / 3),
        "answer_changed": pytest.approx(2 / 3),  # no number or anchor: the normalized text is the answer
        "mean_edit_distance": pytest.approx((1 + 1 + 2) / 3),  # on the raw text: the trailing space counts
    }
    assert all(math.isnan(v) for v in edit_stats([], []).values())


def test_answer_changed_reads_the_final_answer_not_the_wording():
    first = ["The answer is 14.", "The answer is 14.", "7 + 7 = 14", "The answer is 14."]
    second = ["I think the answer is 14.", "The answer is 15.", "7 + 7 = 14. The answer is 14.", "The answer is 14. "]
    text_changed, answer_changed = change_flags(first, second)
    assert text_changed == [True, True, True, False]  # whitespace at the ends is not an edit
    assert answer_changed == [False, True, False, False]
    stats = edit_stats(first, second)
    assert stats["text_changed"] == 0.75 and stats["answer_changed"] == 0.25 and stats["no_edit"] == 0.25
    # the reader can be swapped, e.g. for code: here the first character is the "answer"
    assert change_flags(["ab"], ["ac"], answer_of=lambda text: text[0]) == ([True], [False])


def test_intervals_and_edit_distance():
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # textbook value for 5/10
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert bootstrap_interval([1.0] * 20) == (1.0, 1.0)
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3


def test_exact_mcnemar_by_hand():
    # 15 flips to correct against 7 to incorrect (seed 1's SCoRe in the first round): 2 * P(X <= 7), X ~ Bin(22, 1/2)
    tail = sum(math.comb(22, i) for i in range(8)) / 2**22
    assert mcnemar_exact(15, 7) == pytest.approx(2 * tail) == pytest.approx(0.1338, abs=1e-4)
    assert mcnemar_exact(7, 15) == mcnemar_exact(15, 7)  # two-sided
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # the smallest p five one-way flips can give
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_t_quantiles_and_the_interval_over_three_seeds():
    # Student's t table: 12.706 (1 df), 4.303 (2 df), 2.228 (10 df), 1.960 in the limit
    assert student_t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert student_t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-3)
    assert student_t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-3)
    assert student_t_quantile(0.025, 2) == pytest.approx(-4.3027, abs=1e-3)
    # The first round's Δ(score) per seed: 0.0, +2.5, 0.0 -> mean 0.833, sd 1.443, half-width 4.303 * 1.443 / sqrt(3)
    result = t_interval([0.0, 2.5, 0.0])
    assert result["mean"] == pytest.approx(5 / 6)
    assert (result["low"], result["high"]) == pytest.approx((5 / 6 - 3.5855, 5 / 6 + 3.5855), abs=1e-3)
    assert math.isnan(t_interval([1.0])["low"])


def test_stratified_bootstrap_keeps_the_seeds_and_resamples_problems():
    same = stratified_bootstrap([[1.0] * 10, [0.0] * 10])
    assert same == {"mean": 0.5, "low": 0.5, "high": 0.5}  # no problem-level variance: the seeds are held fixed
    spread = stratified_bootstrap([[0.0, 1.0] * 50])
    assert spread["low"] < 0.5 < spread["high"] and spread["high"] - spread["low"] == pytest.approx(0.2, abs=0.03)
