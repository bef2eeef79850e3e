"""Dataset adapters: GSM8K, MATH, MBPP, HumanEval and the seed's SCoRe format -> TRL conversational `prompt` plus the
columns the task's reward reads, and the task's correction instruction per row."""

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, load_dataset
from jinja2 import TemplateError

from .config import MATH_CORRECTION_INSTRUCTION
from .feedback import doctest_asserts
from .models import resolve_file


@dataclass(frozen=True)
class Task:
    """How a task is asked, corrected and scored."""

    prompt_template: str  # formatted with the row's `question`
    correction_instruction: str
    reward: str  # name in score_trl.rewards.REWARD_FUNCS


MATH_PROMPT = (
    "Solve the following problem. Reason step by step, then give the answer on the last line in the form "
    '"Final Answer: The final answer is $answer$. I hope it is correct." where answer is the final answer '
    "(a number or a LaTeX expression).\n\nProblem: {question}"
)
CODE_PROMPT = (
    "Write a Python program for the task below. Reply with the code in a single ```python block.\n\nTask: {question}"
)
CODE_CORRECTION_INSTRUCTION = (
    "There might be an error in the code above because of a lack of understanding of the task. Please correct the "
    "error, if any, and rewrite the complete program in a single ```python block. Only output the final program!"
)
SHORT_ANSWER_PROMPT = "Answer the question in one short sentence.\n\nQuestion: {question}"
SHORT_ANSWER_CORRECTION_INSTRUCTION = (
    "There might be an error in the answer above. Please check it, correct it if needed, and give your final answer "
    "in one short sentence."
)

ARITHMETIC_PROMPT = "Answer the question. End your answer with the result as a number.\n\nQuestion: {question}"
ARITHMETIC_CORRECTION_INSTRUCTION = (
    "There might be an error in the answer above. Please check the calculation, correct it if needed, and end your "
    "answer with the result as a number."
)

TASKS = {
    "math": Task(MATH_PROMPT, MATH_CORRECTION_INSTRUCTION, "math"),
    "code": Task(CODE_PROMPT, CODE_CORRECTION_INSTRUCTION, "code"),
    "short_answer": Task(SHORT_ANSWER_PROMPT, SHORT_ANSWER_CORRECTION_INSTRUCTION, "exact_match"),
    # score_trl.cli.arithmetic's generated problems (question, answer): the reproduction's task
    "arithmetic": Task(ARITHMETIC_PROMPT, ARITHMETIC_CORRECTION_INSTRUCTION, "numeric"),
}

# Source format -> (required columns, optional columns kept for the reward, task)
FORMATS = {
    "gsm8k": (("question", "answer"), (), "math"),
    "math": (("problem", "solution"), ("answer", "level", "type", "unique_id"), "math"),
    "mbpp": (("text", "test_list"), ("test_setup_code", "task_id"), "code"),
    "humaneval": (("prompt", "test", "entry_point"), ("task_id",), "code"),
    "score": (("question", "correct_answer"), ("original_answer",), "short_answer"),
}
# The tests `correction_feedback="tests"` runs and reports on, per code format (the reward runs all of them): MBPP's
# first test_list assert (its prompt lists test_list, as is standard; the feedback repeats no other test), HumanEval's
# docstring examples, which its prompt shows (the hidden `check` tests are never run for feedback).
VISIBLE_TESTS = {
    "mbpp": lambda row: list(row["test_list"][:1]),
    "humaneval": lambda row: doctest_asserts(row["prompt"], row.get("entry_point")),
}
_QUESTION = {"gsm8k": "question", "math": "problem", "mbpp": "text", "humaneval": "prompt", "score": "question"}


class DataFormatError(ValueError):
    """A data file or row that cannot be used, with where and how to fix it."""


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a local CSV, JSON (a list of objects, or {"data": [...]}) or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path} line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}). Re-save the file as UTF-8."
        ) from None
    if not text.strip():
        raise DataFormatError(f"{path} is empty.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    elif suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataFormatError(f"{path} line {number}: invalid JSON ({err.msg}).") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path} line {err.lineno}: invalid JSON ({err.msg}).") from None
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataFormatError(f"{path}: expected a list of objects or {{'data': [...]}}.")
    else:
        raise DataFormatError(f"{path}: unsupported extension {suffix!r}; use .csv, .json or .jsonl.")
    if not rows:
        raise DataFormatError(f"{path} has no rows.")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataFormatError(f"{path} row {number}: expected an object with named columns, got {row!r:.60}.")
    return rows


def detect_format(columns) -> str:
    """The source format whose required columns are all present (checked in a fixed order)."""
    columns = set(columns)
    for name in ("math", "mbpp", "humaneval", "score", "gsm8k"):
        if set(FORMATS[name][0]) <= columns:
            return name
    expected = "; ".join(f"{name}: {', '.join(required)}" for name, (required, _, _) in FORMATS.items())
    raise DataFormatError(
        f"Cannot tell the dataset's format from its columns {sorted(columns)}. Expected one of ({expected}), or "
        "name your columns with question_column/answer_column."
    )


def build_prompt(question: str, template: str, system_prompt: str | None = None, tokenizer=None) -> list[dict]:
    """The conversational prompt. A system prompt stays a system message when the tokenizer's template accepts one,
    else it is folded into the first user turn (Gemma's template rejects the system role)."""
    user = {"role": "user", "content": template.format(question=question)}
    if not system_prompt:
        return [user]
    messages = [{"role": "system", "content": system_prompt}, user]
    if tokenizer is not None:
        try:
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:
            return [{"role": "user", "content": f"{system_prompt}\n\n{user['content']}"}]
    return messages


def check_required(row: dict, required: tuple, format: str, where: str):
    """Every column the format needs, present and not empty; else an error naming the row and the columns."""
    for column in required:
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataFormatError(
                f"{where}: missing or empty column {column!r} (the {format} format needs {', '.join(required)})."
            )


def question_text(row: dict, format: str) -> str:
    """The question as the prompt states it: MBPP's task with its tests (they fix the function name the model must
    use), HumanEval's signature and docstring as a function to complete."""
    question = row[_QUESTION[format]]
    if format == "mbpp":
        question = f"{question}\nYour code should pass these tests:\n" + "\n".join(row["test_list"])
    if format == "humaneval":
        question = f"Complete this function:\n```python\n{question}```"
    return question


def to_score_rows(
    rows: list[dict],
    source: str,
    format: str | None = None,
    task: str | None = None,
    question_column: str | None = None,
    answer_column: str | None = None,
    system_prompt: str | None = None,
    tokenizer=None,
    first_attempt_fraction: float = 0.0,
    seed: int = 0,
    plain_template: str | None = None,
) -> list[dict]:
    """Rows in a source format -> rows with `prompt`, the reward's columns and `correction_instruction`.

    `question_column`/`answer_column` map generic data (the format is then "gsm8k"-like: question and answer).
    `first_attempt_fraction` of the rows that carry an `original_answer` (the seed format) get it as `first_attempt`:
    the trainer then uses it as y1 instead of sampling, trains only the correction on those rows.
    `plain_template` (for base models) makes each prompt a string: the template with {question} filled in, after the
    system prompt when one is given.
    """
    if plain_template is not None and "{question}" not in plain_template:
        raise DataFormatError(f"plain_template={plain_template!r} has no {{question}} to put the question in.")
    if question_column or answer_column:
        rows = [
            _rename(row, {question_column or "question": "question", answer_column or "answer": "answer"})
            for row in rows
        ]
        format = format or "gsm8k"
    format = format or detect_format(rows[0].keys())
    if format not in FORMATS:
        raise DataFormatError(f"Unknown format {format!r}; choose one of {sorted(FORMATS)}.")
    required, optional, default_task = FORMATS[format]
    task_spec = TASKS[task or default_task]
    if not 0.0 <= first_attempt_fraction <= 1.0:
        raise DataFormatError(f"first_attempt_fraction={first_attempt_fraction} must lie in [0, 1].")
    rng = random.Random(seed)

    out = []
    for number, row in enumerate(rows, start=1):
        check_required(row, required, format, f"{source} row {number}")
        question = question_text(row, format)
        item = {
            "prompt": build_prompt(question, task_spec.prompt_template, system_prompt, tokenizer)
            if plain_template is None
            else (f"{system_prompt}\n\n" if system_prompt else "") + plain_template.format(question=question),
            "task": task or default_task,  # per row, so that mixed-task data can pick each row's reward
            "correction_instruction": task_spec.correction_instruction,
        }
        for column in (*required, *optional):
            if column in row and column != "prompt":
                item[column] = row[column]
        if format in VISIBLE_TESTS:  # what correction_feedback="tests" may show; the reward runs every test
            item["visible_tests"] = VISIBLE_TESTS[format](row)
        if "original_answer" in row and first_attempt_fraction > 0:
            use = row["original_answer"] and rng.random() < first_attempt_fraction
            item["first_attempt"] = row["original_answer"] if use else None
        out.append(item)
    return out


def default_reward_names(dataset) -> list[str]:
    """The reward for rows built here: their task's (`TASKS[task].reward`), or `task` (each row its own task's
    reward, `rewards.task_reward`) when the rows mix tasks."""
    tasks = sorted(set(dataset["task"]))
    return [TASKS[tasks[0]].reward] if len(tasks) == 1 else ["task"]


def load_score_dataset(
    path_or_id: str, split: str = "train", config_name: str | None = None, limit: int | None = None, **kwargs
) -> Dataset:
    """A local CSV/JSON/JSONL file (or `package:NAME/FILE` inside an installed package) or a hub dataset id -> a
    dataset ready for SCoReTrainer. See `to_score_rows`."""
    if path_or_id.startswith("package:"):
        path_or_id = str(resolve_file(path_or_id))
    if Path(path_or_id).suffix.lower() in (".csv", ".json", ".jsonl") or Path(path_or_id).is_file():
        rows = read_rows(path_or_id)
    else:
        rows = list(load_dataset(path_or_id, config_name, split=split))
    if limit is not None:
        rows = rows[:limit]
    return Dataset.from_list(to_score_rows(rows, source=str(path_or_id), **kwargs))


def _rename(row: dict, mapping: dict) -> dict:
    return {mapping.get(key, key): value for key, value in row.items()}
