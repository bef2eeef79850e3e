"""What every entry point shares: the recipe on the command line, the data options, the model source, CPU threads."""

import os
import sys
from dataclasses import dataclass, field


@dataclass
class DataArguments:
    """Which data, in which format, asked how: the options of `score_trl.data.load_score_dataset`."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A local .jsonl/.json/.csv file, `package:NAME/FILE` inside an installed package, or a hub "
            "dataset id (see score_trl.data)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_format: str | None = field(
        default=None,
        metadata={"help": "gsm8k, math, mbpp, humaneval or score (the seed format); detected from columns if unset."},
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": "math, code, short_answer or arithmetic: prompt, correction instruction and default reward "
            "(from the format if unset)."
        },
    )
    question_column: str | None = field(default=None, metadata={"help": "Question column of generic data."})
    answer_column: str | None = field(default=None, metadata={"help": "Answer column of generic data."})
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt; folded into the user turn when the chat template has no system role."},
    )

    plain_prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Plain-text prompts for base models: each prompt is this text with {question} filled in (e.g. a "
            "few-shot block ending in 'Answer:'), and the correction is appended as text (plain_correction_format). "
            "Unset: conversational prompts with the task's wording."
        },
    )

    def adapter_kwargs(self, tokenizer) -> dict:
        """Keyword arguments of `load_score_dataset` / `to_score_rows` for these options."""
        return dict(
            format=self.dataset_format,
            task=self.task,
            question_column=self.question_column,
            answer_column=self.answer_column,
            system_prompt=self.system_prompt,
            tokenizer=tokenizer,
            plain_template=self.plain_prompt_template,
        )


@dataclass
class ModelSourceArguments:
    """Where the model comes from besides ModelConfig's `model_name_or_path`: a GGUF file, and a chat template."""

    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file (path, `package:NAME/FILE` inside an installed package, or `package:NAME` for a "
            "package with assemble()). Converted once to a cached transformers folder, which replaces "
            "model_name_or_path."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template for a tokenizer without one: a .jinja path or `trl:NAME` (e.g. trl:gemma)."},
    )


def recipe_argv(argv: list[str] | None = None) -> list[str]:
    """Command-line arguments with a leading recipe path turned into `--config PATH` (TrlParser's form)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", argv[0], *argv[1:]]
    return argv


def parse(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """TRL's parser over `dataclass_types`: a recipe given first (or with --config), then command-line overrides;
    unknown keys fail."""
    from trl import TrlParser

    return TrlParser(dataclass_types).parse_args_and_config(recipe_argv(argv))


def set_cpu_threads(threads: int | None = None, local_processes: int = 1) -> int:
    """Intra-op threads for a CPU run: `threads`, else this job's cores shared among the local processes. `accelerate
    launch` without `--cpu` exports OMP_NUM_THREADS=1, which leaves all but one core idle."""
    import torch

    threads = threads or max(len(os.sched_getaffinity(0)) // max(local_processes, 1), 1)
    torch.set_num_threads(threads)
    return threads


def provenance() -> dict:
    """What produced a result, written by the run itself: where the code was, its git commit and whether the tree had
    uncommitted changes (None outside a checkout), the packages' versions, the exact command, and the process's peak
    resident memory so far (ru_maxrss, this process only)."""
    import importlib.metadata
    import resource
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "score_trl"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "code": str(root),
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "versions": versions,
        "command": [sys.executable, *sys.argv],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
