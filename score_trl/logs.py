"""SCoReTrainer's logging, RLOO-compatible: every key RLOOTrainer logs, per attempt under `turn{t}/` and, for the last
attempt, also under RLOO's own name (so dashboards built for RLOO read the final answer's numbers); the
self-correction statistics; RLOO's `_logs` record and SCoRe's completions table with every attempt. Functions take
the trainer, as TRL's logging helpers do, and write into its `_metrics` and `_logs`."""

from contextlib import contextmanager

import pandas as pd
import torch
from accelerate.utils import gather_object
from transformers import is_trackio_available, is_wandb_available
from transformers.utils import is_rich_available
from trl.trainer.utils import nanstd, print_prompt_completions_sample

from .feedback import told_incorrect
from .metrics import clip_stats, length_stats, reward_stats
from .scoring import answered_conversations, as_completion, is_plain
from .stats import change_flags, self_correction_stats


if is_wandb_available():
    import wandb
if is_trackio_available():
    import trackio


def attempt_keys(key: str, attempt: int, num_attempts: int) -> list[str]:
    """Where attempt `attempt` (1-based) logs `key`: `turn{attempt}/key`, and also the bare `key` for the last one."""
    return [f"turn{attempt}/{key}"] + ([key] if attempt == num_attempts else [])


def log_attempt_lengths(trainer, attempt: int, completion_ids: list[list[int]], mode: str):
    """RLOO's `completions/*` length statistics of one attempt, gathered across processes."""
    device = trainer.accelerator.device
    lengths = trainer.accelerator.gather(torch.tensor([len(ids) for ids in completion_ids], device=device))
    truncated = trainer.accelerator.gather(torch.tensor(trainer._is_truncated(completion_ids), device=device))
    for key, value in length_stats(lengths, truncated).items():
        for name in attempt_keys(f"completions/{key}", attempt, trainer.num_attempts):
            trainer._metrics[mode][name].append(value)


def log_reward_functions(trainer, mode: str, attempt: int, per_func: torch.Tensor):
    """Each reward function's mean and std on one attempt, and RLOO's `_logs["rewards"]` record of its values."""
    for i, name in enumerate(trainer.reward_func_names):
        values = per_func[:, i]
        stats = {"mean": torch.nanmean(values).item(), "std": nanstd(values).item()}
        for key, value in stats.items():
            for full in attempt_keys(f"rewards/{name}/{key}", attempt, trainer.num_attempts):
                trainer._metrics[mode][full].append(value)
        # RLOO's record of the latest generation batch: the final attempt under the function's name
        for key in [f"{name}/turn{attempt}"] + ([name] if attempt == trainer.num_attempts else []):
            trainer._logs["rewards"][key].extend(values.tolist())


def log_rollout(trainer, mode, rewards, targets, texts, num_generations):
    """Per-attempt reward statistics, the shaped reward, and the self-correction statistics of the gathered rows:
    accuracies, i→c, c→i, and whether the last attempt changed the text and the answer its reward grades."""
    metrics = trainer._metrics[mode]
    for t in range(trainer.num_attempts):
        metrics[f"turn{t + 1}/shaped_reward"].append(torch.nanmean(targets[:, t]).item())
        for key, value in reward_stats(rewards[:, t], num_generations).items():
            for name in attempt_keys(key, t + 1, trainer.num_attempts):
                metrics[name].append(value)
    for key, value in self_correction_stats(rewards, trainer.args.correct_threshold).items():
        metrics[f"self_correction/{key}"].append(value)
    flags = change_flags(texts[-2], texts[-1], trainer._graded_answer)
    local = torch.tensor(flags, dtype=torch.float32, device=trainer.accelerator.device)
    changed = trainer.accelerator.gather(local.T.contiguous())
    metrics["self_correction/text_changed"].append(changed[:, 0].mean().item())
    metrics["self_correction/answer_changed"].append(changed[:, 1].mean().item())


def log_feedback(trainer, mode: str, attempt: int, feedback: list, rewards: list, cut: int):
    """With `correction_feedback`: the share of rows (all processes) whose correction turn after `attempt` told the
    model its attempt was wrong (`feedback.told_incorrect`), also as `self_correction/told_incorrect` for the turn
    before the last attempt (beside i→c and c→i), and how many feedback texts were cut to `feedback_max_tokens`."""
    threshold = trainer.args.correct_threshold
    told = sum(told_incorrect(f, r, threshold) for f, r in zip(feedback, rewards, strict=True))
    local = torch.tensor([told, len(feedback), cut], dtype=torch.float32, device=trainer.accelerator.device)
    told, rows, cut = trainer.accelerator.gather(local).view(-1, 3).sum(dim=0).tolist()
    metrics = trainer._metrics[mode]
    metrics[f"feedback/told_incorrect_after_turn{attempt}"].append(told / max(rows, 1))
    metrics[f"feedback/truncated_after_turn{attempt}"].append(cut)
    if attempt == trainer.num_attempts - 1:
        metrics["self_correction/told_incorrect"].append(told / max(rows, 1))


def flush_reward_logs(trainer, mode: str, num_rows: int):
    """What reward functions logged through `log_extra`/`log_metric` (renamed per attempt), gathered across processes.

    Copied from trl.trainer.rloo_trainer.RLOOTrainer._generate_and_score_completions (1.16.0), with the columns also
    kept for SCoRe's table. Keys must be sorted so that all ranks call gather_object (and, for the metrics,
    accelerator.gather) in the same order, otherwise values get mis-attributed across columns (dict insertion order may
    differ between processes)."""
    for column in sorted(set(gather_object(list(trainer._pending_extra_logs)))):
        values = gather_object(trainer._pending_extra_logs.get(column, [None] * num_rows))
        trainer._attempt_logs[column].extend(values)
        trainer._logs["extra"][column].extend(values)
    trainer._pending_extra_logs.clear()
    for name in sorted(set(gather_object(list(trainer._pending_metrics)))):
        values = trainer._pending_metrics.get(name, [])
        local = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=trainer.accelerator.device)
        total, count = trainer.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
        trainer._metrics[mode][name].append(total / count)
    trainer._pending_metrics.clear()


def log_table_rows(trainer, prompts, texts, corrections, rewards, advantages):
    """RLOO's record (`_logs`, read by its table and by callbacks): the prompt, the whole self-correction conversation
    after it as the completion, and the final attempt's advantage; and SCoRe's table rows, one column per attempt.
    `corrections[t][i]`: row i's correction turn after attempt t."""
    if is_plain(prompts):  # the continuation as one string: y1, the correction turn's text, y2, ...
        after_prompt = answered_conversations(["" for _ in prompts], texts, corrections, trainer.num_attempts - 1,
                                              trainer.args.plain_correction_format)  # fmt: skip
        conversations = [turns + last for turns, last in zip(after_prompt, texts[-1], strict=True)]
    else:
        after_prompt = answered_conversations([[] for _ in prompts], texts, corrections, trainer.num_attempts - 1)
        conversations = [[*turns, *as_completion(last)] for turns, last in zip(after_prompt, texts[-1], strict=True)]
    trainer._logs["prompt"].extend(gather_object(prompts))
    trainer._logs["completion"].extend(gather_object(conversations))
    trainer._logs["advantages"].extend(advantages[:, -1].tolist())
    logs = trainer._attempt_logs
    logs["prompt"].extend(gather_object([p if isinstance(p, str) else p[-1]["content"] for p in prompts]))
    for t in range(trainer.num_attempts):
        logs[f"attempt_{t + 1}"].extend(gather_object(texts[t]))
        logs[f"reward_{t + 1}"].extend(rewards[:, t].tolist())
        logs[f"advantage_{t + 1}"].extend(advantages[:, t].tolist())


def log_loss_terms(trainer, mode, masks, per_turn_kl, entropies, ratio, advantages):
    """The loss's metrics, reduced across processes: per-turn and overall KL (per-token means over each turn's trained
    tokens), entropy, and RLOO's clip ratios per turn and overall."""
    metrics, accelerator, num_attempts = trainer._metrics[mode], trainer.accelerator, trainer.num_attempts
    trained = masks.sum(dim=1)
    if per_turn_kl is not None:
        totals = accelerator.reduce(torch.cat([per_turn_kl.detach().sum(0), masks.sum(dim=(0, 2))]), "sum")
        for t in range(num_attempts):
            metrics[f"turn{t + 1}/kl"].append((totals[t] / totals[num_attempts + t].clamp(min=1.0)).item())
        # RLOO's `kl`: per-token mean over every trained token of every attempt
        metrics["kl"].append((totals[:num_attempts].sum() / totals[num_attempts:].sum().clamp(min=1.0)).item())
    entropy = accelerator.reduce(torch.stack([(entropies * trained).sum(), trained.sum()]), reduction="sum")
    metrics["entropy"].append((entropy[0] / entropy[1].clamp(min=1.0)).item())
    low = accelerator.gather(((ratio < 1 - trainer.epsilon_low) & (advantages < 0)).float())
    high = accelerator.gather(((ratio > 1 + trainer.epsilon_high) & (advantages > 0)).float())
    for t in range(num_attempts):
        metrics[f"turn{t + 1}/clip_ratio/low_mean"].append(low[:, t].mean().item())
        metrics[f"turn{t + 1}/clip_ratio/high_mean"].append(high[:, t].mean().item())
    for key, value in clip_stats(low, high).items():
        metrics[f"clip_ratio/{key}"].append(value)


def write_completions_table(trainer):
    """SCoRe's completions table (every attempt with its reward and advantage), printed with rich as RLOO prints its
    own, and sent to wandb / trackio."""
    rows = {key: list(values) for key, values in trainer._attempt_logs.items()}
    step, last = trainer.state.global_step, trainer.num_attempts
    if is_rich_available():
        print_prompt_completions_sample(
            rows["prompt"],
            rows[f"attempt_{last}"],
            {f"reward_{t}": rows[f"reward_{t}"] for t in range(1, last + 1)},
            rows[f"advantage_{last}"],
            step,
            trainer.num_completions_to_print,
            extra={key: rows[key] for t in range(1, last) for key in (f"attempt_{t}", f"advantage_{t}")},
        )
    table = pd.DataFrame({"step": [step] * len(rows["prompt"]), **rows})
    if trainer.log_unique_prompts:
        table = table[~table["prompt"].duplicated()]
    report_to = trainer.args.report_to or []
    if "wandb" in report_to and wandb.run is not None:
        wandb.log({"completions": wandb.Table(dataframe=table)})
    if "trackio" in report_to:
        trackio.log({"completions": trackio.Table(dataframe=table)})


@contextmanager
def reward_logs_of_attempt(trainer, attempt: int):
    """Reward functions log through log_extra/log_metric into shared buffers; keep each attempt's entries apart
    (renamed `{key}/turn{attempt}`, and under the key alone for the last attempt) so the calls neither double the rows
    nor mix the turns."""
    pending = dict(trainer._pending_extra_logs), dict(trainer._pending_metrics)
    trainer._pending_extra_logs.clear()
    trainer._pending_metrics.clear()
    try:
        yield
    finally:
        last = attempt == trainer.num_attempts
        for saved, new in zip(pending, (trainer._pending_extra_logs, trainer._pending_metrics), strict=True):
            saved.update({f"{k}/turn{attempt}": v for k, v in new.items()})
            saved.update(dict(new) if last else {})
            new.clear()
            new.update(saved)
