import math

import pytest
import torch

from score_trl.objective import (
    clipped_policy_loss,
    k3_kl,
    kl_coefficients,
    leave_one_out_advantages,
    per_turn_sums,
    shaped_rewards,
    stage_at,
)
from score_trl.turns import turn_masks


nan = float("nan")
# [r1, r2] for two prompts x two first attempts: wrong->right, right->right | right->wrong, wrong->wrong
REWARDS = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])


def test_stage_schedule():
    assert [stage_at(s, 2) for s in range(4)] == [1, 1, 2, 2]
    assert [stage_at(s, 0) for s in range(3)] == [2, 2, 2]
    assert [stage_at(s, 10) for s in range(3)] == [1, 1, 1]


def test_stage_one_trains_turn_two_on_r2_only():
    targets = shaped_rewards(REWARDS, stage=1, alpha=10.0)
    assert targets.tolist() == [[0, 1], [0, 1], [0, 0], [0, 0]]
    adv = leave_one_out_advantages(targets, num_generations=2)
    # turn 1: no reward signal; turn 2: r2 minus the other attempt's r2
    assert adv.tolist() == [[0, 0], [0, 0], [0, 0], [0, 0]]
    targets = shaped_rewards(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), stage=1, alpha=10.0)
    adv = leave_one_out_advantages(targets, num_generations=2)
    assert adv.tolist() == [[0, 1], [0, -1], [0, -1], [0, 1]]


def test_stage_two_bonus_on_turn_two_only():
    targets = shaped_rewards(REWARDS, stage=2, alpha=10.0)
    # turn 2: r2 + 10 (r2 - r1) = 11, 1, -10, 0; turn 1: r1
    assert targets.tolist() == [[0, 11], [1, 1], [1, -10], [0, 0]]
    adv = leave_one_out_advantages(targets, num_generations=2)
    # turn 1 baseline is the other r1 (no bonus ever reaches turn 1): 0-1, 1-0, 1-0, 0-1
    assert adv[:, 0].tolist() == [-1, 1, 1, -1]
    # turn 2: 11-1, 1-11, -10-0, 0-(-10)
    assert adv[:, 1].tolist() == [10, -10, -10, 10]


def test_leave_one_out_skips_unscorable_rows():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0], [nan, 2.0], [1.0, 0.0]])
    adv = leave_one_out_advantages(rewards, num_generations=4)
    # column 0, scorable {1, 0, 1}: 1 - (0+1)/2, 0 - (1+1)/2, unscorable -> 0, 1 - (1+0)/2
    assert adv[:, 0].tolist() == [0.5, -1.0, 0.0, 0.5]
    # column 1: 1 - (0+2+0)/3, 0 - 3/3, 2 - 1/3, 0 - 3/3
    assert adv[:, 1].tolist() == pytest.approx([1 / 3, -1.0, 5 / 3, -1.0])
    # A prompt group with a single scorable attempt has no baseline: zero advantage
    alone = leave_one_out_advantages(torch.tensor([[1.0, 1.0], [nan, nan]]), num_generations=2)
    assert alone.tolist() == [[0, 0], [0, 0]]


def test_stage_two_nan_first_attempt_makes_turn_two_unscorable():
    targets = shaped_rewards(torch.tensor([[nan, 1.0], [1.0, 1.0]]), stage=2, alpha=10.0)
    assert math.isnan(targets[0, 1]) and targets[1, 1] == 1.0


def test_normalized_advantages_per_turn():
    targets = torch.tensor([[0.0, 1.0], [1.0, 3.0], [0.0, 0.0], [1.0, 0.0]])
    adv = leave_one_out_advantages(targets, num_generations=2, normalize=True)
    # raw: turn 1 [-1, 1, -1, 1], turn 2 [-2, 2, 0, 0]; each standardized by its own (unbiased) std
    assert adv[:, 0].tolist() == pytest.approx([-1 / (2 / math.sqrt(3) + 1e-4), 1 / (2 / math.sqrt(3) + 1e-4)] * 2)
    std2 = math.sqrt(8 / 3)
    assert adv[:, 1].tolist() == pytest.approx([-2 / (std2 + 1e-4), 2 / (std2 + 1e-4), 0.0, 0.0])


def test_kl_coefficients_per_stage():
    assert kl_coefficients(1, beta=0.01, beta2=0.1) == (0.1, 0.01)
    assert kl_coefficients(2, beta=0.01, beta2=0.1) == (0.01, 0.01)


def test_k3_and_turn_sums_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.2, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.4, 0.9]]))
    kl = k3_kl(logp, ref)
    # exp(d) - d - 1 with d = ref - logp: d = ln 0.5 -> 0.5 + ln 2 - 1; d = 0 -> 0; d = ln 2 -> 2 - ln 2 - 1
    expected = [0.5 + math.log(2) - 1, 0.0, 1 - math.log(2), 0.0]
    assert kl[0].tolist() == pytest.approx(expected, abs=1e-6)
    masks = turn_masks(torch.tensor([[1, 0, 2, 2]]), 2)
    sums = per_turn_sums(kl, masks)
    assert sums[0].tolist() == pytest.approx([expected[0], expected[2]], abs=1e-6)


def test_clipped_policy_loss_by_hand():
    logps = torch.tensor([[0.5, -0.5], [0.1, 0.0]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, -1.0], [-2.0, 3.0]])
    loss, ratio = clipped_policy_loss(logps, old, adv, 0.2, 0.2)
    # e^0.5 with A=1 clips at 1.2; e^-0.5 with A=-1 clips at 0.8 -> -(-0.8); e^0.1 = 1.105 is inside [0.8, 1.2]
    assert loss.flatten().tolist() == pytest.approx([-1.2, 0.8, 2 * math.exp(0.1), -3.0], abs=1e-6)
    assert ratio[0, 0].item() == pytest.approx(math.exp(0.5))


def test_injected_tokens_get_no_gradient():
    # Loss assembled as the trainer does: gradients reach attempt tokens only, never the instruction or padding.
    turn_ids = torch.tensor([[1, 1, 0, 0, 2, 0]])
    masks = turn_masks(turn_ids, 2)
    per_token = torch.full((1, 6), -1.0, requires_grad=True)
    ref = torch.full((1, 6), -2.0)
    logps = per_turn_sums(per_token, masks)
    loss, _ = clipped_policy_loss(logps, logps.detach(), torch.tensor([[0.5, -1.0]]), 0.2, 0.2)
    loss = loss + torch.tensor([[0.1, 0.01]]) * per_turn_sums(k3_kl(per_token, ref), masks)
    loss.sum().backward()
    assert per_token.grad[0, 2:4].tolist() == [0.0, 0.0] and per_token.grad[0, 5].item() == 0.0
    assert (per_token.grad[0, [0, 1, 4]] != 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# K = 3 attempts, by hand

# [r1, r2, r3] for one prompt x four first attempts
REWARDS_3 = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def test_three_attempts_stage_one():
    targets = shaped_rewards(REWARDS_3, stage=1, alpha=10.0)
    # attempt 1 trained by KL only; attempts 2 and 3 on their own reward
    assert targets.tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 0]]
    adv = leave_one_out_advantages(targets, num_generations=4)
    # r minus the mean of the other three; attempt 2: 1 - 1/3, 0 - 2/3, 0 - 2/3, 1 - 1/3;
    # attempt 3: 1 - 1/3, 1 - 1/3, 0 - 2/3, 0 - 2/3
    assert adv[:, 0].tolist() == [0, 0, 0, 0]
    assert adv[:, 1].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert adv[:, 2].tolist() == pytest.approx([2 / 3, 2 / 3, -2 / 3, -2 / 3])
    assert kl_coefficients(1, beta=0.01, beta2=0.1, num_attempts=3) == (0.1, 0.01, 0.01)


def test_three_attempts_stage_two_bonus_on_each_correction():
    targets = shaped_rewards(REWARDS_3, stage=2, alpha=10.0)
    # attempt 2: r2 + 10 (r2 - r1) = 11, -10, 0, 1;  attempt 3: r3 + 10 (r3 - r2) = 1, 11, 0, -10
    assert targets.tolist() == [[0, 11, 1], [1, -10, 11], [0, 0, 0], [1, 1, -10]]
    adv = leave_one_out_advantages(targets, num_generations=4)
    # attempt 1: r1 - mean of the others' r1 = 0 - 2/3, 1 - 1/3, 0 - 2/3, 1 - 1/3
    assert adv[:, 0].tolist() == pytest.approx([-2 / 3, 2 / 3, -2 / 3, 2 / 3])
    # attempt 2 (column sum 2): 11 - (-9)/3, -10 - 12/3, 0 - 2/3, 1 - 1/3
    assert adv[:, 1].tolist() == pytest.approx([11 + 3, -10 - 4, 0 - 2 / 3, 1 - 1 / 3])
    # attempt 3 (column sum 2): 1 - 1/3, 11 - (-9)/3, 0 - 2/3, -10 - 12/3
    assert adv[:, 2].tolist() == pytest.approx([1 - 1 / 3, 11 + 3, 0 - 2 / 3, -10 - 4])
    assert kl_coefficients(2, beta=0.01, beta2=0.1, num_attempts=3) == (0.01, 0.01, 0.01)


def test_three_attempts_unscorable_middle_attempt():
    targets = shaped_rewards(torch.tensor([[1.0, nan, 1.0]]), stage=2, alpha=10.0)
    # the missing r2 makes attempt 2 and the bonus of attempt 3 unscorable
    assert targets[0, 0] == 1.0 and math.isnan(targets[0, 1]) and math.isnan(targets[0, 2])
