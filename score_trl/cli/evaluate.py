"""`score-eval` / `scripts/evaluate_score.py`: the paper's self-correction table for any model or adapter.

score-eval --model_name_or_path google/gemma-2-2b-it --adapter outputs/run --benchmark gsm8k --output_dir eval/s2
score-eval --model_name_or_path google/gemma-2-2b-it --adapter outputs/run --benchmark gsm8k \
    --correction_feedback verdict --output_dir eval/s2_verdict
score-eval --compare eval/base eval/s1 eval/s2 eval/s2_verdict --labels base "Stage I" "Stage II" "Stage II, verdict" \
    --output_dir eval/compare
"""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from .common import DataArguments, ModelSourceArguments, parse


# Public benchmarks by short name: (hub id, config, split). A local file in the same format works via dataset_name.
BENCHMARKS = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "humaneval": ("openai/openai_humaneval", None, "test"),
    "mbpp": ("google-research-datasets/mbpp", "full", "test"),
}


@dataclass
class EvalArguments(DataArguments, ModelSourceArguments):
    """What to evaluate, how, and where the results go (the data and model-source options are shared with the other
    entry points)."""

    output_dir: str = field(
        default="eval", metadata={"help": "Folder for records.jsonl (resumable), summary.json, table.md, plot.png."}
    )
    label: str | None = field(default=None, metadata={"help": "Name of this run in tables and plots."})
    benchmark: str | None = field(
        default=None, metadata={"help": f"Public benchmark by name: {', '.join(BENCHMARKS)} (hub ids)."}
    )
    split: str | None = field(default=None, metadata={"help": "Hub split (benchmark's default: test)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N problems only."})
    adapter: str | None = field(default=None, metadata={"help": "A LoRA adapter folder applied to the base model."})
    backend: str = field(
        default="auto",
        metadata={
            "help": "auto (vLLM when installed with a GPU and no adapter or 4-bit, else transformers generate), "
            "vllm, continuous_batching or generate."
        },
    )
    vllm_enforce_eager: bool = field(
        default=False,
        metadata={"help": "vLLM backend: no compiled graphs (starts in seconds; compiling takes minutes on CPU)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Problems per generation batch (and per JSONL flush)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Max new tokens per attempt."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (with do_sample); no top-k or top-p cut, as in RLOO training."},
    )
    num_samples: int = field(default=1, metadata={"help": "Attempts per problem when sampling."})
    num_attempts: int = field(
        default=2, metadata={"help": "Attempts per problem: y1 and num_attempts - 1 corrections (>= 2)."}
    )
    correction_instruction: str | None = field(
        default=None, metadata={"help": "Instruction for every problem; the task's own (as in training) if unset."}
    )
    correction_feedback: str = field(
        default="none",
        metadata={
            "help": "What the correction turn says about the attempt just made, as in training (SCoReConfig): none, "
            "verdict, tests (code: visible tests only) or a dotted path to a feedback function."
        },
    )
    feedback_max_tokens: int | None = field(
        default=256, metadata={"help": "Feedback longer than this many tokens is cut, as in training."}
    )
    plain_correction_format: str = field(
        default="\n\n{correction}\n\n",
        metadata={"help": "Plain-text prompts: the text after an attempt around {correction}, as in training."},
    )
    stop_strings: list[str] | None = field(
        default=None, metadata={"help": "Strings that end an attempt (base models), cut as in training."}
    )
    reward_funcs: list[str] | None = field(
        default=None, metadata={"help": "Reward names or dotted paths; the task's reward if unset."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions, as in training (default: 1 each)."}
    )
    reward_clip_range: list[float] | None = field(
        default=None, metadata={"help": "[min, max] of the combined reward, as in training (default: no clipping)."}
    )
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={"help": "Chat template arguments as in training: a JSON object (e.g. enable_thinking false)."},
    )
    correct_threshold: float = field(default=0.5, metadata={"help": "An attempt is correct when reward >= this."})
    compare: list[str] | None = field(
        default=None, metadata={"help": "Instead of evaluating: output folders of earlier runs to compare."}
    )
    labels: list[str] | None = field(default=None, metadata={"help": "Labels of the compared runs."})


def parse_args(argv: list[str] | None = None):
    """(EvalArguments, ModelConfig) from a recipe given first (or with --config) and command-line overrides."""
    from trl import ModelConfig

    return parse((EvalArguments, ModelConfig), argv)


def load_model(eval_args, model_args):
    """(model or None, tokenizer, generator) for the chosen backend."""
    import torch
    from trl import get_quantization_config

    from ..generation import TransformersGenerator, VLLMGenerator
    from ..models import load_for_generation, resolve_model

    path, tokenizer = resolve_model(
        model_args.model_name_or_path, eval_args.gguf_file, eval_args.chat_template, model_args.model_revision
    )
    quantization = get_quantization_config(model_args)
    backend = eval_args.backend
    if backend == "auto":
        vllm_ok = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
        backend = "vllm" if vllm_ok and not eval_args.adapter and quantization is None else "generate"
    if backend not in ("vllm", "generate", "continuous_batching"):
        raise ValueError(f"backend={backend!r}: choose auto, vllm, continuous_batching or generate.")
    sampling = dict(
        max_new_tokens=eval_args.max_new_tokens, do_sample=eval_args.do_sample, temperature=eval_args.temperature
    )
    if backend == "vllm":
        if eval_args.adapter:
            raise ValueError("The vLLM backend takes no adapter here: merge it first, or use backend: generate.")
        from vllm import LLM

        llm = LLM(model=path, tokenizer=path, dtype=model_args.dtype or "auto", revision=model_args.model_revision,
                  enforce_eager=eval_args.vllm_enforce_eager)  # fmt: skip
        return None, tokenizer, VLLMGenerator(llm, stop_strings=eval_args.stop_strings, **sampling)
    model = load_for_generation(path, model_args.dtype, eval_args.adapter, quantization,
                                model_args.attn_implementation, model_args.model_revision)  # fmt: skip
    continuous = backend == "continuous_batching"
    generator = TransformersGenerator(model, tokenizer, continuous=continuous, stop_strings=eval_args.stop_strings,
                                      **sampling)  # fmt: skip
    return model, tokenizer, generator


def main(eval_args, model_args):
    from ..evaluation import evaluate
    from ..feedback import check_feedback_inputs
    from .report import compare_runs, markdown_table, write_report

    if eval_args.compare:
        paths = compare_runs(eval_args.compare, eval_args.labels, eval_args.output_dir)
        print(paths["table"].read_text())
        return paths
    check_eval_args(eval_args)
    model, tokenizer, generator = load_model(eval_args, model_args)
    dataset, reward_funcs = load_data(eval_args, tokenizer)
    check_feedback_inputs(eval_args.correction_feedback, [dataset[0]] if len(dataset) else [], tokenizer,
                          dataset_name=eval_args.dataset_name or eval_args.benchmark)  # fmt: skip
    output_dir = Path(eval_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = evaluate(
        generator,
        tokenizer,
        dataset,
        reward_funcs,
        output_jsonl=output_dir / "records.jsonl",
        batch_size=eval_args.batch_size,
        correction_instruction=eval_args.correction_instruction,
        num_samples=eval_args.num_samples,
        threshold=eval_args.correct_threshold,
        num_attempts=eval_args.num_attempts,
        chat_template_kwargs=template_kwargs(eval_args.chat_template_kwargs),
        reward_weights=eval_args.reward_weights,
        reward_clip_range=tuple(eval_args.reward_clip_range) if eval_args.reward_clip_range else None,
        correction_feedback=eval_args.correction_feedback,
        feedback_max_tokens=eval_args.feedback_max_tokens,
        plain_correction_format=eval_args.plain_correction_format,
    )
    label = eval_args.label or Path(eval_args.adapter or model_args.model_name_or_path or eval_args.gguf_file).name
    paths = write_report(summary, output_dir, label)
    print(markdown_table([summary], [label]))
    return paths


def template_kwargs(value) -> dict | None:
    """`chat_template_kwargs` from a recipe (a mapping) or the command line (a JSON object)."""
    import json

    return json.loads(value) if isinstance(value, str) else value


def check_eval_args(eval_args):
    """Settings that cannot work, refused before anything loads."""
    from ..feedback import resolve_feedback

    if eval_args.benchmark and eval_args.benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark={eval_args.benchmark!r}: choose one of {sorted(BENCHMARKS)}.")
    if not eval_args.dataset_name and not eval_args.benchmark:
        raise ValueError("Set benchmark (gsm8k, math500, humaneval, mbpp) or dataset_name (a file or hub id).")
    if eval_args.num_attempts < 2:
        raise ValueError(f"num_attempts={eval_args.num_attempts}: evaluate at least 2 attempts (y1 and a correction).")
    if eval_args.reward_weights is not None and eval_args.reward_funcs is not None:
        if len(eval_args.reward_weights) != len(eval_args.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(eval_args.reward_weights)} values for {len(eval_args.reward_funcs)} "
                "reward_funcs: give one weight per reward function."
            )
    resolve_feedback(eval_args.correction_feedback)  # an unknown mode or a path that does not import fails here
    if eval_args.num_samples > 1 and not eval_args.do_sample:
        raise ValueError(
            f"num_samples={eval_args.num_samples} with greedy decoding repeats identical attempts: set do_sample "
            "true to sample each problem several times, or num_samples 1."
        )


def load_data(eval_args, tokenizer):
    """(dataset, reward functions): the benchmark's or dataset_name's rows, and the task's reward unless given."""
    from ..data import default_reward_names, load_score_dataset
    from ..rewards import get_reward_funcs

    hub_id, config, split = BENCHMARKS.get(eval_args.benchmark, (None, None, "test"))
    dataset = load_score_dataset(
        eval_args.dataset_name or hub_id,
        split=eval_args.split or split,
        config_name=eval_args.dataset_config or (config if not eval_args.dataset_name else None),
        limit=eval_args.limit,
        **eval_args.adapter_kwargs(tokenizer),
    )
    return dataset, get_reward_funcs(eval_args.reward_funcs or default_reward_names(dataset))


def cli(argv: list[str] | None = None):
    main(*parse_args(argv))


if __name__ == "__main__":
    cli()
