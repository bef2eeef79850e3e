"""Self-correction evaluation: the paper's Acc@t1, Acc@t2, Δ, Δi→c, Δc→i with confidence intervals, for K attempts.

For each problem: y1, then the correction turn built from token ids exactly as in training (`generation.roll_out`,
`feedback.CorrectionTurns`, `score_trl.turns`: with `correction_feedback`, the feedback on the attempt just made
before the instruction), then y2 (and so on up to yK), all from a generator (`score_trl.generation`); every attempt is
scored as training scores it (`score_trl.scoring`: the conversation it answered, the reward functions combined with
their weights and clipping). "Answer changed" reads the answer the reward grades. Results are appended per problem to
a JSONL file, so a killed run continues where it stopped.
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .config import CORRECT_THRESHOLD, PLAIN_CORRECTION_FORMAT
from .feedback import CorrectionTurns, told_incorrect
from .generation import Generator, prompt_ids, roll_out
from .scoring import answered_conversations, graded_answer, score_texts
from .stats import bootstrap_interval, edit_stats, self_correction_stats, wilson_interval
from .turns import instruction_for


def evaluate(
    generator: Generator,
    tokenizer,
    dataset,
    reward_funcs: list[Callable],
    output_jsonl: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    correction_instruction: str | None = None,
    num_samples: int = 1,
    threshold: float = CORRECT_THRESHOLD,
    progress: bool = True,
    num_attempts: int = 2,
    chat_template_kwargs: dict | None = None,
    reward_weights: list[float] | None = None,
    reward_clip_range: tuple[float, float] | None = None,
    correction_feedback="none",
    feedback_max_tokens: int | None = None,
    plain_correction_format: str = PLAIN_CORRECTION_FORMAT,
) -> dict:
    """Evaluate self-correction on `dataset` (rows from `score_trl.data`); returns `summarize(records)`.

    `generator` maps prompt token ids to completion ids and decides how (greedy or sampled, how many tokens): see
    `score_trl.generation`. Each problem gets `num_attempts` attempts (y1 and num_attempts - 1 corrections), and is
    attempted `num_samples` times (more than one only means something with a sampling generator). With `output_jsonl`,
    each problem's record is appended as soon as it is scored and problems already in the file are skipped, so an
    interrupted evaluation resumes without redoing work. `chat_template_kwargs`, `reward_weights` and
    `reward_clip_range` are the training config's (`SCoReConfig`), so that prompts render and rewards combine as in
    training. `correction_feedback` ("none", "verdict", "tests", a dotted path or a function) and
    `feedback_max_tokens` build the correction turn as `SCoReConfig`'s fields of the same names do; each record then
    holds the feedback after each attempt (`feedback_1`, ...). Plain-text prompts (strings, for base models) get the
    correction appended as text with `plain_correction_format`, as in training; a generator with `stop_strings` cuts
    attempts as training does.
    """
    turns = CorrectionTurns(tokenizer, chat_template_kwargs, correction_feedback, feedback_max_tokens,
                            threshold=threshold, plain_format=plain_correction_format)  # fmt: skip
    rows = list(dataset)[:limit] if limit is not None else list(dataset)
    records = read_records(output_jsonl) if output_jsonl else []
    done = {(r["index"], r["sample"]) for r in records}
    jobs = [(i, s) for i in range(len(rows)) for s in range(num_samples) if (i, s) not in done]
    out = open(output_jsonl, "a") if output_jsonl else None  # noqa: SIM115 (closed below)
    try:
        bar = _progress(len(jobs), progress)
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            new = _evaluate_batch(generator, tokenizer, rows, batch, reward_funcs, correction_instruction,
                                  num_attempts, turns, (reward_weights, reward_clip_range))  # fmt: skip
            records += new
            if out is not None:
                out.write("".join(json.dumps(record) + "\n" for record in new))
                out.flush()
            bar.update(len(batch))
        bar.close()
    finally:
        if out is not None:
            out.close()
    return {"correction_feedback": turns.name} | summarize(records, threshold, graded_answer(reward_funcs))


def _evaluate_batch(generator, tokenizer, rows, batch, reward_funcs, correction_instruction, num_attempts, turns,
                    combine):  # fmt: skip
    """Records of one batch of (row index, sample) jobs: every attempt's text and reward, and the feedback after it.
    Each attempt is scored before the next is generated, since its correction turn may carry feedback on it."""
    batch_rows = [rows[i] for i, _ in batch]
    prompts = [row["prompt"] for row in batch_rows]
    instructions = [instruction_for(row, correction_instruction) for row in batch_rows]
    texts, rewards, corrections, feedback = [], [], [], []

    def generate(t, context_ids):
        attempt = generator(context_ids)
        texts.append(tokenizer.batch_decode(attempt, skip_special_tokens=True))
        conversations = answered_conversations(prompts, texts, corrections, t, turns.plain_format)
        rewards.append(score_texts(reward_funcs, conversations, texts[t], batch_rows, *combine))
        return attempt

    def bridges_after(t, attempt):
        conversations = answered_conversations(prompts, texts, corrections, t, turns.plain_format)
        text, bridges, said, _ = turns.after(batch_rows, instructions, conversations, texts[t], attempt, rewards[t])
        corrections.append(text)
        feedback.append(said)
        return bridges

    roll_out(generate, prompt_ids(tokenizer, prompts, turns.kwargs), bridges_after, num_attempts)
    return [
        {
            "index": index,
            "sample": sample,
            "id": _row_id(batch_rows[k], index),
            "question": prompts[k] if isinstance(prompts[k], str) else prompts[k][-1]["content"],
            **{f"attempt_{t + 1}": texts[t][k] for t in range(num_attempts)},
            **{f"reward_{t + 1}": rewards[t][k] for t in range(num_attempts)},
            **({f"feedback_{t + 1}": feedback[t][k] for t in range(num_attempts - 1)} if turns.func else {}),
        }
        for k, (index, sample) in enumerate(batch)
    ]


def read_records(path, repair: bool = True) -> list[dict]:
    """Records of an evaluation JSONL; a last line cut off by a crash is dropped (it is redone), and with `repair`
    the file is rewritten without it so that appending continues on a clean line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if repair:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def attempts_in(records: list[dict]) -> int:
    """Number of attempts the records hold (attempt_1 ... attempt_K)."""
    return max((int(key.split("_")[1]) for r in records for key in r if key.startswith("reward_")), default=2)


def summarize(records: list[dict], threshold: float = CORRECT_THRESHOLD, answer_of=None) -> dict:
    """The paper's table from evaluation records, for K attempts, under `score_trl.stats`' keys. Rows with an
    unscorable attempt are left out (and counted as `unscorable`). Adds 95% intervals: Wilson on each accuracy
    (`accuracy_t{t}_ci`), a paired bootstrap on Δ (`delta_ci`). `answer_of` reads the answer the reward grades, for
    `answer_changed` (`scoring.graded_answer`)."""
    k = attempts_in(records)
    scored = [r for r in records if all(r.get(f"reward_{t}") is not None for t in range(1, k + 1))]
    n = len(scored)
    rewards = torch.tensor([[r[f"reward_{t}"] for t in range(1, k + 1)] for r in scored], dtype=torch.float64)
    correct = (rewards.reshape(n, k) >= threshold).double()
    summary = {"n": n, "unscorable": len(records) - n, "num_attempts": k}
    summary |= self_correction_stats(rewards.reshape(n, k), threshold)
    for t in range(k):
        summary[f"accuracy_t{t + 1}_ci"] = wilson_interval(int(correct[:, t].sum()), n)
    summary["delta_ci"] = bootstrap_interval((correct[:, -1] - correct[:, 0]).tolist())
    for t in range(1, k):
        if any(f"feedback_{t}" in r for r in scored):  # the share of rows whose correction turn said "incorrect"
            told = [told_incorrect(r.get(f"feedback_{t}"), r[f"reward_{t}"], threshold) for r in scored]
            summary[f"told_incorrect_t{t}"] = sum(told) / n if n else 0.0
    previous, last = [r[f"attempt_{k - 1}"] for r in scored], [r[f"attempt_{k}"] for r in scored]
    return summary | edit_stats(previous, last, answer_of)


def _row_id(row: dict, index: int):
    for key in ("id", "task_id", "unique_id"):
        if row.get(key) is not None:
            return row[key]
    return index


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="self-correction eval", unit="problem")
