"""How an attempt is scored, one path for training and evaluation: the conversation it answered, its completion as a
chat message, the weighted combination of the reward functions, and the answer the reward grades (for telling
whether a revision changed the answer)."""

from collections.abc import Callable

import torch

from .config import PLAIN_CORRECTION_FORMAT


def as_completion(text: str, plain: bool = False) -> list[dict] | str:
    """A completion as TRL passes it to reward functions: a chat message for conversational prompts, the text itself
    for plain-text (standard) prompts."""
    return text if plain else [{"role": "assistant", "content": text}]


def is_plain(prompts: list) -> bool:
    """Plain-text (standard) prompts: strings, as TRL's standard format; otherwise conversational."""
    return bool(prompts) and isinstance(prompts[0], str)


def answered_conversations(prompts: list, texts: list[list[str]], corrections: list[list[str]], t: int,
                           plain_format: str = PLAIN_CORRECTION_FORMAT) -> list:  # fmt: skip
    """The conversation attempt `t` (0-based) answered: x, then y1 and the correction turn after it, ... up to attempt
    t. `corrections[s][i]` is row i's correction turn after attempt s (its feedback and instruction). Plain-text
    prompts answer a string: x + y1 + `plain_format` around the correction + y2 ..."""
    if is_plain(prompts):
        answered = list(prompts)
        for s in range(t):
            answered = [
                p + text + plain_format.format(correction=correction)
                for p, text, correction in zip(answered, texts[s], corrections[s], strict=True)
            ]
        return answered
    conversations = prompts
    for s in range(t):
        conversations = [
            [*c, *as_completion(text), {"role": "user", "content": correction}]
            for c, text, correction in zip(conversations, texts[s], corrections[s], strict=True)
        ]
    return conversations


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor, clip_range: tuple | None = None) -> torch.Tensor:
    """(N,) rewards from (N, F) per-function rewards (NaN where a function returned None): the weighted sum over the
    functions that scored the row, clipped to `clip_range`; NaN where no function scored it.

    Copied from trl.trainer.rloo_trainer.RLOOTrainer._generate_and_score_completions (1.16.0), so that evaluation
    combines exactly as training does: a completion for which every reward function returned None is unscorable.
    nansum would collapse it to 0, which both biases the leave-one-out baseline and hands the completion a spurious
    advantage. Mark these rows NaN so they're excluded from the (nan-aware) baseline."""
    unscorable = torch.isnan(per_func).all(dim=1)
    rewards = (per_func * weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    if clip_range:
        rewards = rewards.clamp(min=clip_range[0], max=clip_range[1])
    return rewards


def score_texts(reward_funcs: list[Callable], conversations: list, texts: list[str], rows: list[dict],
                weights=None, clip_range=None) -> list[float | None]:  # fmt: skip
    """Rewards of plain-callable reward functions (TRL's signature) on `texts`, combined as in training; None where
    no function scored the row. `rows` give the reward's columns (every key but `prompt`)."""
    completions = [as_completion(text, is_plain(conversations)) for text in texts]
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
    per_func = torch.tensor(
        [[_nan(v) for v in func(prompts=conversations, completions=completions, **columns)] for func in reward_funcs],
        dtype=torch.float64,
    ).T.reshape(len(texts), len(reward_funcs))
    weights = torch.ones(len(reward_funcs), dtype=torch.float64) if weights is None else torch.as_tensor(weights)
    combined = combine_rewards(per_func, weights.to(torch.float64), clip_range)
    return [None if torch.isnan(v) else v.item() for v in combined]


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def graded_answer(reward_funcs: list) -> Callable[[str], str | None]:
    """What the first reward function grades in a completion, for "did the revision change the answer": the anchored
    answer for `math`, the last number for `numeric`, the normalized text for `exact_match`, the program for `code`.
    For any other function (a user's, or the per-row `task` reward): the anchored answer, else the last number, else
    the normalized text (`rewards.final_answer`)."""
    from . import rewards

    readers = {
        rewards.math_answer_reward: rewards.extract_answer,
        rewards.math_strict_reward: lambda text: rewards.extract_answer(text, strict=True),
        rewards.numeric_reward: rewards.last_number,
        rewards.exact_match_reward: rewards.normalize_text,
        rewards.code_execution_reward: lambda text: rewards.extract_code(text).strip(),
    }
    first = reward_funcs[0] if reward_funcs else None
    return readers.get(first, rewards.final_answer)
