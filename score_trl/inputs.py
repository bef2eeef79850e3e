"""Checks on what a user hands the trainer, run before any model loads: each failure names the input and the fix."""

import itertools
import os

from datasets import Dataset, IterableDataset
from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl.trainer.utils import get_config_model_id


# Columns the trainer itself reads: kept by `remove_unused_columns=True`, which drops every other column
TRAINER_COLUMNS = ("prompt", "correction_instruction", "first_attempt")


def surviving_columns(rows: list[dict], remove_unused_columns: bool) -> list[dict]:
    """The rows as the trainer will see them: only TRAINER_COLUMNS when `remove_unused_columns` is set."""
    if not remove_unused_columns:
        return rows
    return [{key: value for key, value in row.items() if key in TRAINER_COLUMNS} for row in rows]


def check_engine(args):
    """Refuse an FSDP launch on CPU. accelerate turns an FSDP config into FSDP only on GPU-type devices; on CPU it
    silently trains plain DDP, every parameter whole on every rank, which is not what was asked for."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and args.device.type == "cpu":
        raise ValueError(
            "An FSDP accelerate config was launched on CPU, where accelerate does not apply FSDP and would silently "
            "run DDP instead. On CPU launch with DDP (--multi_gpu) or DeepSpeed "
            "(recipes/accelerate_configs/cpu/zero2.yaml, zero3.yaml); use FSDP on GPUs."
        )


def named_eval_datasets(eval_dataset):
    if eval_dataset is None:
        return []
    if isinstance(eval_dataset, dict):
        return [(f"eval_dataset[{key!r}]", ds) for key, ds in eval_dataset.items()]
    return [("eval_dataset", eval_dataset)]


def first_rows(dataset, count: int) -> list[dict]:
    """Up to `count` leading rows; an IterableDataset is read only as far as that."""
    if isinstance(dataset, Dataset):
        return [dataset[i] for i in range(min(count, len(dataset)))]
    if isinstance(dataset, IterableDataset):
        return list(itertools.islice(iter(dataset), count))
    return []


def check_dataset(dataset, name: str, prompts_per_generation: int | None = None) -> list[dict]:
    """Fail early on a dataset SCoRe cannot roll out; returns its first rows (map-style or iterable)."""
    if dataset is None:
        return []
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {columns}). Map each row to a conversational prompt for a "
            "chat model, e.g. `dataset.map(lambda x: {'prompt': [{'role': 'user', 'content': x['question']}]})`, "
            "or to a plain-text one for a base model, e.g. `dataset.map(lambda x: {'prompt': x['question']})`."
        )
    if prompts_per_generation and isinstance(dataset, Dataset) and len(dataset) < prompts_per_generation:
        raise ValueError(
            f"{name} has {len(dataset)} rows, but one generation batch takes {prompts_per_generation} distinct "
            "prompts (per_device_train_batch_size x processes x steps_per_generation / num_generations). Add rows, "
            "or lower per_device_train_batch_size or steps_per_generation (or raise num_generations)."
        )
    rows = first_rows(dataset, 2)
    if rows and "prompt" not in rows[0]:
        raise ValueError(f"{name} row 1 has no 'prompt' (keys: {sorted(rows[0])}). Give each row a prompt.")
    kinds = set()
    for number, row in enumerate(rows, start=1):
        prompt = row["prompt"]
        chat = isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)
        if not chat and not isinstance(prompt, str):
            raise ValueError(
                f"{name} row {number}: 'prompt' must be conversational (a list of {{'role', 'content'}} messages, "
                "for chat models: the correction is a user turn) or a string (plain text, for base models: the "
                f"correction is appended as text with plain_correction_format), got {type(prompt).__name__}."
            )
        kinds.add(chat)
    if len(kinds) > 1:
        raise ValueError(
            f"{name} mixes conversational and plain-text prompts in its first rows: use one format for every row."
        )
    return rows


def check_renders(tokenizer, prompt, chat_template_kwargs):
    try:
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **chat_template_kwargs)
    except TemplateError as err:
        hint = ""
        if any(m["role"] == "system" for m in prompt):
            hint = (
                " The prompt has a system message and this template rejects the system role (as Gemma's does): fold "
                "the system text into the first user turn."
            )
        raise ValueError(f"train_dataset row 1: the chat template cannot render the prompt: {err}.{hint}") from err


def default_tokenizer(model, args):
    """The tokenizer RLOOTrainer would load for `model` when none is given, padded and truncated on the left."""
    init_kwargs = args.model_init_kwargs or {}
    return AutoTokenizer.from_pretrained(
        model if isinstance(model, str) else get_config_model_id(model.config),
        revision=init_kwargs.get("revision"),
        padding_side="left",
        truncation_side="left",
        trust_remote_code=args.trust_remote_code,
    )


def check_tokenizer(processing_class):
    """A text tokenizer with a pad token, or an error that says what to pass instead."""
    if not isinstance(processing_class, PreTrainedTokenizerBase):
        raise TypeError(
            f"SCoReTrainer is text-only: `processing_class` must be a tokenizer, got "
            f"{type(processing_class).__name__}. Pass `processor.tokenizer`."
        )
    if processing_class.pad_token is None:
        raise ValueError(
            "The tokenizer has no pad token. Set one before building the trainer, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token` (padding is always masked out)."
        )
    return processing_class


def check_inputs(model, args, train_dataset, eval_dataset, processing_class):
    """The checks SCoReTrainer runs before it loads anything, but the reward functions' (`reward_checks`): the launch,
    the model path, the datasets, the tokenizer and its rendering of the first prompt, the correction turn (a chat
    turn, or for plain-text prompts the formatted text) and its feedback (`feedback.check_feedback_inputs`). Returns
    (tokenizer, the first training rows)."""
    from .feedback import check_feedback_inputs
    from .models import check_model_path
    from .turns import find_turn_bridge, instruction_for, plain_bridge

    check_engine(args)
    if isinstance(model, str):
        check_model_path(model)
    first = check_dataset(train_dataset, "train_dataset", args.generation_batch_size // args.num_generations)
    for name, dataset in named_eval_datasets(eval_dataset):
        check_dataset(dataset, name)
    processing_class = check_tokenizer(processing_class or default_tokenizer(model, args))
    instruction = instruction_for(first[0] if first else {}, args.correction_instruction)
    if first and isinstance(first[0]["prompt"], str):  # plain text: no chat template needed (base models)
        plain_bridge(processing_class, args.plain_correction_format.format(correction=instruction))
    else:
        find_turn_bridge(processing_class, instruction, args.chat_template_kwargs or {})
        if first:
            check_renders(processing_class, first[0]["prompt"], args.chat_template_kwargs or {})
    check_feedback_inputs(args.feedback_function, first, processing_class, args.remove_unused_columns,
                          args.reward_timeout)  # fmt: skip
    return processing_class, first
