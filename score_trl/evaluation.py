"""Self-correction evaluation: the paper's Acc@t1, Acc@t2, Δ, Δi→c, Δc→i with confidence intervals.

For each problem: y1 (greedy by default), then the correction turn built from token ids exactly as in training
(`score_trl.turns`), then y2; both scored with the task's reward. Results are appended per problem to a JSONL file, so
a killed run continues where it stopped.
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
) -> tuple[list[list[int]], list[list[int]]]:
    """First and second attempts (token ids) for a batch of conversational prompts; the second attempt's prompt is
    built from the first attempt's ids exactly as in training."""
    kwargs = chat_template_kwargs or {}
    prompt_ids = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
    )["input_ids"]
    first = generator(prompt_ids)
    bridges = {text: find_turn_bridge(tokenizer, text, kwargs) for text in set(instructions)}
    _, second_prompts = next_attempt_prompts(prompt_ids, first, [bridges[text] for text in instructions])
    return first, generator(second_prompts)


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
) -> dict:
    """Evaluate self-correction on `dataset` (rows from `score_trl.data`); returns `summarize(records)`.

    With `output_jsonl`, each problem's record is appended as soon as it is scored and problems already in the file
    are skipped, so an interrupted evaluation resumes without redoing work. With `do_sample`, each problem is
    attempted `num_samples` times. `generator` maps prompt token ids to completion ids (default: transformers'
    padded `generate` on `model`); see `TransformersGenerator` and `VLLMGenerator`.
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
            first, second = generate_attempts(generator, tokenizer, prompts, instructions)
            texts1 = tokenizer.batch_decode(first, skip_special_tokens=True)
            texts2 = tokenizer.batch_decode(second, skip_special_tokens=True)
            rewards1 = score(reward_funcs, prompts, texts1, batch_rows)
            rewards2 = score(reward_funcs, prompts, texts2, batch_rows)
            for k, (index, sample) in enumerate(batch):
                record = {
                    "index": index,
                    "sample": sample,
                    "id": _row_id(batch_rows[k], index),
                    "question": prompts[k][-1]["content"],
                    "attempt_1": texts1[k],
                    "attempt_2": texts2[k],
                    "reward_1": rewards1[k],
                    "reward_2": rewards2[k],
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


def summarize(records: list[dict], threshold: float = 0.5) -> dict:
    """The paper's table from evaluation records. Rows with an unscorable attempt are left out (and counted)."""
    scored = [r for r in records if r["reward_1"] is not None and r["reward_2"] is not None]
    n = len(scored)
    c1 = [r["reward_1"] >= threshold for r in scored]
    c2 = [r["reward_2"] >= threshold for r in scored]
    i2c = sum(not a and b for a, b in zip(c1, c2, strict=True))
    c2i = sum(a and not b for a, b in zip(c1, c2, strict=True))
    deltas = [float(b) - float(a) for a, b in zip(c1, c2, strict=True)]
    same = sum(r["attempt_1"].strip() == r["attempt_2"].strip() for r in scored)
    distances = [edit_distance(r["attempt_1"], r["attempt_2"]) for r in scored]

    def share(k):
        return k / n if n else math.nan

    return {
        "n": n,
        "unscorable": len(records) - n,
        "accuracy_t1": share(sum(c1)),
        "accuracy_t1_ci": wilson_interval(sum(c1), n),
        "accuracy_t2": share(sum(c2)),
        "accuracy_t2_ci": wilson_interval(sum(c2), n),
        "delta": share(sum(c2) - sum(c1)),
        "delta_ci": bootstrap_interval(deltas),
        "incorrect_to_correct": share(i2c),
        "correct_to_incorrect": share(c2i),
        "no_edit": share(same),
        "mean_edit_distance": sum(distances) / n if n else math.nan,
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
