"""`score-train` / `scripts/train_score.py`: SCoRe training from a YAML recipe, in TRL's script shape.

    accelerate launch scripts/train_score.py recipes/gemma2b.yaml [--flag value ...]

The recipe is a flat YAML of ScoreScriptArguments, SCoReConfig and ModelConfig fields (plus an `env:` block); flags
on the command line override it. Unknown keys fail.
"""

from dataclasses import dataclass, field

from accelerate.logging import get_logger

from .common import DataArguments, ModelSourceArguments, parse, set_cpu_threads


logger = get_logger(__name__)


@dataclass
class ScoreScriptArguments(DataArguments, ModelSourceArguments):
    """Data, reward and model-file arguments of the SCoRe training script (the data and model-source options are
    shared with the other entry points)."""

    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training (hub datasets)."})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Evaluation data (file or hub id); defaults to dataset_name's dataset_test_split."},
    )
    dataset_test_split: str = field(default="test", metadata={"help": "Split used for evaluation (hub datasets)."})
    first_attempt_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of seed-format rows whose original_answer serves as an off-policy first attempt."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward names (math, math_strict, exact_match, numeric, code) or dotted paths to functions; the "
            "task's reward if unset."
        },
    )
    compare_before_after: int = field(
        default=0,
        metadata={
            "help": "Greedy self-correction evaluation (Acc@t1, Acc@t2, Δ) on this many eval rows before and after "
            "training, printed as a table. 0 disables."
        },
    )
    eval_max_new_tokens: int = field(
        default=256, metadata={"help": "Max new tokens per attempt in the before/after evaluation."}
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "Threads per process when training on CPU. None: the cores available to this job divided by "
            "the processes on this machine (`accelerate launch` alone leaves OMP_NUM_THREADS=1)."
        },
    )


def parse_args(argv: list[str] | None = None):
    """(ScoreScriptArguments, SCoReConfig, ModelConfig) from a recipe given first (or with --config) and overrides."""
    from trl import ModelConfig

    from ..config import SCoReConfig

    return parse((ScoreScriptArguments, SCoReConfig, ModelConfig), argv)


def check_launch(script_args, training_args, model_args):
    """Combinations that cannot work, refused before anything is loaded."""
    from ..inputs import check_engine

    if not script_args.dataset_name:
        raise ValueError("dataset_name is required: a local .jsonl/.json/.csv file or a hub dataset id.")
    if not model_args.model_name_or_path and not script_args.gguf_file:
        raise ValueError("Set model_name_or_path (hub id or local folder) or gguf_file.")
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and not model_args.use_peft:
        raise ValueError(
            "load_in_4bit/load_in_8bit weights cannot be trained directly: set use_peft: true (QLoRA) or drop the "
            "quantization."
        )
    plugin = training_args.deepspeed_plugin
    if quantized and plugin is not None and plugin.zero_stage == 3:
        raise ValueError(
            "DeepSpeed ZeRO-3 cannot shard bitsandbytes 4/8-bit weights. Launch QLoRA with "
            "recipes/accelerate_configs/zero2.yaml or multi_gpu.yaml, or use ZeRO-3 without quantization."
        )
    check_engine(training_args)
    if quantized and training_args.use_cpu:
        raise ValueError("bitsandbytes quantization needs a GPU; drop load_in_4bit/load_in_8bit for CPU runs.")


def resolve_resume(training_args) -> str | None:
    """`resume_from_checkpoint`: a checkpoint folder, or true/last for the newest *complete* checkpoint in output_dir
    (incomplete ones are logged and skipped; none: start from scratch, so a requeued job can always pass `last`)."""
    from ..checkpoints import last_complete_checkpoint

    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in ("true", "last"):
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            logger.warning(f"No complete checkpoint in {training_args.output_dir}; starting from scratch.")
        return last
    return value


def load_datasets(script_args, training_args, tokenizer):
    """(train dataset, eval dataset or None): the eval rows are loaded when training evaluates or compares."""
    from ..data import load_score_dataset

    data_kwargs = dict(config_name=script_args.dataset_config, **script_args.adapter_kwargs(tokenizer))
    train_dataset = load_score_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        limit=script_args.max_train_samples,
        first_attempt_fraction=script_args.first_attempt_fraction,
        seed=training_args.seed,
        **data_kwargs,
    )
    eval_dataset = None
    if training_args.eval_strategy != "no" or script_args.compare_before_after:
        eval_dataset = load_score_dataset(
            script_args.eval_dataset_name or script_args.dataset_name,
            split=script_args.dataset_test_split,
            limit=script_args.max_eval_samples,
            **data_kwargs,
        )
    return train_dataset, eval_dataset


def build_trainer(script_args, training_args, model_args):
    """(trainer, eval dataset, reward functions) from the three parsed argument groups, checked before any load."""
    from trl import get_peft_config, get_quantization_config

    from ..data import default_reward_names
    from ..models import resolve_model
    from ..rewards import get_reward_funcs
    from ..trainer import SCoReTrainer

    check_launch(script_args, training_args, model_args)
    if training_args.device.type == "cpu":
        set_cpu_threads(script_args.cpu_threads, training_args.distributed_state.num_processes)
    model_path, tokenizer = resolve_model(
        model_args.model_name_or_path,
        script_args.gguf_file,
        script_args.chat_template,
        model_args.model_revision,
        training_args.trust_remote_code,
    )
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    train_dataset, eval_dataset = load_datasets(script_args, training_args, tokenizer)
    reward_funcs = get_reward_funcs(script_args.reward_funcs or default_reward_names(train_dataset))
    trainer = SCoReTrainer(
        callbacks=step_report_callbacks(),
        model=model_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    return trainer, eval_dataset, reward_funcs


def main(script_args, training_args, model_args):
    """Train, save, and (with compare_before_after) print the before/after table. The process ends here, not in the
    library: with status 75 after a preemption (checkpoint saved), and without teardown in a process group."""
    import torch

    from ..preemption import PREEMPTED_EXIT_CODE, end_process

    trainer, eval_dataset, reward_funcs = build_trainer(script_args, training_args, model_args)
    before = _compare(trainer, eval_dataset, reward_funcs, script_args) if script_args.compare_before_after else None
    trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    if trainer.preempted_at is not None:  # the checkpoint is saved on every rank: "try again later"
        end_process(trainer, PREEMPTED_EXIT_CODE)
    trainer.accelerator.print("Training completed.")
    if trainer.accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.accelerator.device) / 2**30
        trainer.accelerator.print(f"Peak GPU memory: {peak:.2f} GiB (torch.cuda.max_memory_allocated)")
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if before is not None:
        after = _compare(trainer, eval_dataset, reward_funcs, script_args)
        trainer.accelerator.print(format_before_after(before, after))
        if script_args.dataset_name.startswith("package:score_trl/"):  # the bundled demo questions
            trainer.accelerator.print(DEMO_NOTE)
    if trainer.accelerator.num_processes > 1:
        end_process(trainer)  # never returns: ends a process group without the teardown deadlock it can hit
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()
    return trainer


STEP_REPORT = "SCORE_TRL_STEP_REPORT"


def step_report_callbacks() -> list:
    """With the environment variable SCORE_TRL_STEP_REPORT set to a file: one JSON line per logged training step
    (the logged metrics, the step, and torch's peak GPU memory so far), written and flushed as the step is logged.
    `scripts/gpu_check.py` reads it while the run goes on, so a run stopped at its time limit keeps its figures."""
    import json
    import os

    import torch
    from transformers import TrainerCallback

    path = os.environ.get(STEP_REPORT)
    if not path:
        return []

    class StepReport(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or "loss" not in (logs or {}):
                return
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            with open(path, "a") as report:
                report.write(json.dumps({**logs, "step": state.global_step, "peak_gpu_memory_gib": peak}) + "\n")

    return [StepReport()]


def _compare(trainer, eval_dataset, reward_funcs, script_args) -> dict | None:
    from ..evaluation import evaluate
    from ..generation import TransformersGenerator

    if not trainer.accelerator.is_main_process:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    generator = TransformersGenerator(model, trainer.processing_class, max_new_tokens=script_args.eval_max_new_tokens)
    return evaluate(
        generator,
        trainer.processing_class,
        eval_dataset,
        reward_funcs,
        limit=script_args.compare_before_after,
        correction_instruction=trainer.args.correction_instruction,
        batch_size=max(trainer.args.per_device_eval_batch_size, 8),
        num_attempts=trainer.args.num_attempts,
        chat_template_kwargs=trainer.args.chat_template_kwargs,
        reward_weights=trainer.reward_weights.tolist(),
        reward_clip_range=trainer.reward_clip_range,
    )


DEMO_NOTE = (
    "A smoke test of the pipeline, not a result: a few steps, measured on questions it also trains on, so the change "
    "is noise.\nThe held-out measurement with the paper's ablations is in docs/results (README, Results, which says "
    "what it shows and what it does not; re-run it with `make reproduce`)."
)


def format_before_after(before: dict, after: dict) -> str:
    from .report import rows_for

    lines = [f"Self-correction on {before['n']} problems (greedy)", f"{'':<34}{'before':>9}{'after':>9}"]
    lines += [f"{label:<34}{before[key]:>9.3f}{after[key]:>9.3f}" for label, key in rows_for([before, after])]
    return "\n".join(lines)


def cli():
    main(*parse_args())


if __name__ == "__main__":
    cli()
