"""Self-correction evaluation: the paper's Acc@t1, Acc@t2, Δ, Δi→c, Δc→i with confidence intervals, for K attempts.

For each problem: y1 (greedy by default), then the correction turn built from token ids exactly as in training
(`score_trl.turns`), then y2 (and so on up to yK); every attempt is scored with the task's reward. Results are
appended per problem to a JSONL file, so a killed run continues where it stopped.
"""

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig
from trl.trainer.utils import pad

from .config import MATH_CORRECTION_INSTRUCTION
from .turns import find_turn_bridge, next_attempt_prompts


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the model's generation EOS ids plus the tokenizer's EOS (as RLOOTrainer does)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return ids if tokenizer.eos_token_id in ids else [tokenizer.eos_token_id, *ids]


class TransformersGenerator:
    """Greedy or sampled generation with transformers: padded `generate`, or continuous batching (`generate_batch`)."""

    def __init__(self, model, tokenizer, max_new_tokens=256, do_sample=False, temperature=1.0, continuous=False):
        self.model, self.tokenizer, self.continuous = model, tokenizer, continuous
        self.stop_ids = eos_token_ids(model, tokenizer)
        self.config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            eos_token_id=self.stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )

    @torch.no_grad()
    def __call__(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        if self.continuous:
            outputs = self.model.generate_batch(prompt_ids, generation_config=self.config, progress_bar=False)
            rows = [outputs[key].generated_tokens for key in outputs]
        else:
            prompts = [torch.tensor(p) for p in prompt_ids]
            input_ids = pad(prompts, self.tokenizer.pad_token_id, "left").to(self.model.device)
            attention_mask = pad([torch.ones_like(p) for p in prompts], 0, "left").to(self.model.device)
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.config
            )
            rows = output[:, input_ids.size(1) :].tolist()
        completions = []
        for row in rows:  # keep up to and including the first EOS, as the trainer does
            end = next((i for i, token in enumerate(row) if token in self.stop_ids), None)
            completions.append(list(row) if end is None else list(row[: end + 1]))
        return completions


class VLLMGenerator:
    """Generation with vLLM from token ids (prompts are never re-tokenized, as in training)."""

    def __init__(self, llm, max_new_tokens=256, do_sample=False, temperature=1.0):
        from vllm import SamplingParams

        self.llm = llm
        self.params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0)

    def __call__(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompt_ids], self.params, use_tqdm=False
        )
        return [list(output.outputs[0].token_ids) for output in outputs]


def generate_attempts(
    generator: Callable[[list[list[int]]], list[list[int]]],
    tokenizer,
    prompts: list[list[dict]],
    instructions: list[str],
    chat_template_kwargs: dict | None = None,
    num_attempts: int = 2,
) -> list[list[list[int]]]:
    """`num_attempts` attempts (token ids) for a batch of conversational prompts; each later attempt's prompt is built
    from the previous attempts' ids exactly as in training. Returns `attempts[t][i]`."""
    kwargs = chat_template_kwargs or {}
    context = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
    )["input_ids"]
    bridges = {text: find_turn_bridge(tokenizer, text, kwargs) for text in set(instructions)}
    attempts = [generator(context)]
    for _ in range(num_attempts - 1):
        _, context = next_attempt_prompts(context, attempts[-1], [bridges[text] for text in instructions])
        attempts.append(generator(context))
    return attempts


def score(reward_funcs: list[Callable], prompts, texts: list[str], rows: list[dict]) -> list[float | None]:
    """Sum of the rewards (TRL signature) per completion; None where every reward returned None."""
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
    totals = [None] * len(texts)
    for func in reward_funcs:
        for i, value in enumerate(func(prompts=prompts, completions=completions, **columns)):
            if value is not None:
                totals[i] = (totals[i] or 0.0) + value
    return totals


def evaluate(
    model,
    tokenizer,
    dataset,
    reward_funcs: list[Callable],
    output_jsonl: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    limit: int | None = None,
    correction_instruction: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_samples: int = 1,
    threshold: float = 0.5,
    progress: bool = True,
    generator: Callable | None = None,
    num_attempts: int = 2,
) -> dict:
    """Evaluate self-correction on `dataset` (rows from `score_trl.data`); returns `summarize(records)`.

    With `output_jsonl`, each problem's record is appended as soon as it is scored and problems already in the file
    are skipped, so an interrupted evaluation resumes without redoing work. With `do_sample`, each problem is
    attempted `num_samples` times. `generator` maps prompt token ids to completion ids (default: transformers'
    padded `generate` on `model`); see `TransformersGenerator` and `VLLMGenerator`. Each problem gets
    `num_attempts` attempts (y1 and num_attempts - 1 corrections).
    """
    if generator is None:
        generator = TransformersGenerator(model, tokenizer, max_new_tokens, do_sample, temperature)
    rows = list(dataset)[:limit] if limit is not None else list(dataset)
    jobs = [(i, s) for i in range(len(rows)) for s in range(num_samples if do_sample else 1)]
    records = read_records(output_jsonl) if output_jsonl else []
    done = {(r["index"], r["sample"]) for r in records}
    jobs = [job for job in jobs if job not in done]
    out = open(output_jsonl, "a") if output_jsonl else None  # noqa: SIM115 (closed below)
    if model is not None:
        model.eval()
    try:
        bar = _progress(len(jobs), progress)
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            batch_rows = [rows[i] for i, _ in batch]
            prompts = [row["prompt"] for row in batch_rows]
            instructions = [
                correction_instruction or row.get("correction_instruction") or MATH_CORRECTION_INSTRUCTION
                for row in batch_rows
            ]
            attempts = generate_attempts(generator, tokenizer, prompts, instructions, num_attempts=num_attempts)
            texts = [tokenizer.batch_decode(ids, skip_special_tokens=True) for ids in attempts]
            rewards = [score(reward_funcs, prompts, attempt_texts, batch_rows) for attempt_texts in texts]
            for k, (index, sample) in enumerate(batch):
                record = {
                    "index": index,
                    "sample": sample,
                    "id": _row_id(batch_rows[k], index),
                    "question": prompts[k][-1]["content"],
                    **{f"attempt_{t + 1}": texts[t][k] for t in range(num_attempts)},
                    **{f"reward_{t + 1}": rewards[t][k] for t in range(num_attempts)},
                }
                records.append(record)
                if out is not None:
                    out.write(json.dumps(record) + "\n")
            if out is not None:
                out.flush()
            bar.update(len(batch))
        bar.close()
    finally:
        if out is not None:
            out.close()
    return summarize(records, threshold)


def read_records(path) -> list[dict]:
    """Records of an evaluation JSONL; a last line cut off by a crash is dropped (it is redone)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    # Rewrite without a broken tail so that appending continues on a clean line
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


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
    """95% percentile bootstrap interval of a mean (used for Δ, a difference of paired proportions)."""
    if not values:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(draws))
    return (means[int(0.025 * draws)], means[int(0.975 * draws) - 1])


def attempts_in(records: list[dict]) -> int:
    """Number of attempts the records hold (attempt_1 ... attempt_K)."""
    return max((int(key.split("_")[1]) for r in records for key in r if key.startswith("reward_")), default=2)


def summarize(records: list[dict], threshold: float = 0.5) -> dict:
    """The paper's table from evaluation records, for K attempts. Rows with an unscorable attempt are left out (and
    counted).

    `accuracy_t{t}` (with Wilson intervals) for every attempt; `delta`, `incorrect_to_correct` and
    `correct_to_incorrect` compare the first and the last attempt (Δ(t1,tK); the paper's Δ(t1,t2) for K = 2), with a
    paired-bootstrap interval on Δ; `transitions` lists i→c and c→i for each consecutive pair; `no_edit` and
    `mean_edit_distance` compare the last attempt with the one before it.
    """
    k = attempts_in(records)
    scored = [r for r in records if all(r.get(f"reward_{t}") is not None for t in range(1, k + 1))]
    n = len(scored)
    correct = [[r[f"reward_{t}"] >= threshold for r in scored] for t in range(1, k + 1)]

    def share(count):
        return count / n if n else math.nan

    def transition(a: int, b: int) -> dict:
        return {
            "from": a + 1,
            "to": b + 1,
            "incorrect_to_correct": share(sum(not x and y for x, y in zip(correct[a], correct[b], strict=True))),
            "correct_to_incorrect": share(sum(x and not y for x, y in zip(correct[a], correct[b], strict=True))),
        }

    overall = transition(0, k - 1)
    deltas = [float(y) - float(x) for x, y in zip(correct[0], correct[-1], strict=True)]
    last, previous = f"attempt_{k}", f"attempt_{k - 1}"
    summary = {"n": n, "unscorable": len(records) - n, "num_attempts": k}
    for t in range(k):
        summary[f"accuracy_t{t + 1}"] = share(sum(correct[t]))
        summary[f"accuracy_t{t + 1}_ci"] = wilson_interval(sum(correct[t]), n)
    return {
        **summary,
        "delta": share(sum(correct[-1]) - sum(correct[0])),
        "delta_ci": bootstrap_interval(deltas),
        "incorrect_to_correct": overall["incorrect_to_correct"],
        "correct_to_incorrect": overall["correct_to_incorrect"],
        "transitions": [transition(t, t + 1) for t in range(k - 1)],
        "no_edit": share(sum(r[last].strip() == r[previous].strip() for r in scored)),
        "mean_edit_distance": sum(edit_distance(r[previous], r[last]) for r in scored) / n if n else math.nan,
    }


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
