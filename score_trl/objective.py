"""SCoRe's per-turn objective as tensor arithmetic: stage schedule, shaped rewards, advantages, KL, loss.

Shapes: rewards and advantages are (N, K) for K attempts; per-token tensors are (B, C); turn masks (B, K, C).
"""

import torch
from trl.trainer.utils import nanstd


STAGE_ONE, STAGE_TWO = 1, 2


def stage_at(global_step: int, stage_one_steps: int) -> int:
    """Stage I for optimizer steps [0, stage_one_steps), Stage II after."""
    return STAGE_ONE if global_step < stage_one_steps else STAGE_TWO


def shaped_rewards(rewards: torch.Tensor, stage: int, alpha: float) -> torch.Tensor:
    """Per-attempt training rewards from the verifier rewards (N, K) = [r1, ..., rK].

    Stage I: attempt 1 gets no reward (it is trained only by the KL term), attempt t >= 2 gets r_t.
    Stage II: attempt 1 gets r1, attempt t >= 2 gets r_t + alpha * (r_t - r_{t-1}): each correction is paid for
    what it changed relative to the attempt it corrected. An attempt never sees the bonus of the next one: crediting
    it there would penalize a correct earlier attempt.
    NaN (unscorable) stays NaN, and makes the next attempt's bonus NaN, so that the leave-one-out baseline skips it.
    """
    first, later = rewards[:, :1], rewards[:, 1:]
    if stage == STAGE_ONE:
        return torch.cat([torch.where(torch.isnan(first), first, torch.zeros_like(first)), later], dim=1)
    return torch.cat([first, later + alpha * (later - rewards[:, :-1])], dim=1)


def leave_one_out_advantages(rewards: torch.Tensor, num_generations: int, normalize: bool = False) -> torch.Tensor:
    """RLOO advantages per column of (N, K) rewards, rows grouped by prompt in consecutive blocks of num_generations.

    The baseline of a row is the mean of the scorable (non-NaN) other rows of its group, as in RLOOTrainer; rows that
    are unscorable, or alone in their group, get advantage 0. With `normalize`, each column is standardized over its
    scorable rows.
    """
    num_rows, num_turns = rewards.shape
    grouped = rewards.view(-1, num_generations, num_turns)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    total = torch.nansum(grouped, dim=1, keepdim=True)
    if num_generations > 1:
        baseline = (total - grouped) / (scorable - 1)
        advantages = (grouped - baseline).view(num_rows, num_turns)
    else:  # eval with num_generations_eval=1: no baseline, no signal
        advantages = torch.zeros_like(rewards)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages, dim=0)) / (nanstd_columns(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def nanstd_columns(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([nanstd(x[:, k]) for k in range(x.size(1))])


def kl_coefficients(stage: int, beta: float, beta2: float, num_attempts: int = 2) -> tuple[float, ...]:
    """Per-attempt KL coefficients: Stage I (beta2, beta, ..., beta), Stage II (beta, ..., beta)."""
    return ((beta2 if stage == STAGE_ONE else beta),) + (beta,) * (num_attempts - 1)


def k3_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1, always >= 0."""
    delta = ref_per_token_logps - per_token_logps
    return torch.exp(delta) - delta - 1


def per_turn_sums(per_token: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Sum a (B, C) per-token tensor over each turn's tokens: (B, K)."""
    return (per_token.unsqueeze(1) * masks).sum(-1)


def clipped_policy_loss(logps, old_logps, advantages, epsilon_low, epsilon_high):
    """RLOO's sequence-level clipped objective, applied to each turn separately: (B, K) -> (B, K) losses."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio
