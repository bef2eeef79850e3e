"""`make reproduce` / `scripts/reproduce.py`: the self-correction result and the paper's ablations, end to end, over
several training seeds.

    python scripts/reproduce.py recipes/reproduce/smollm2_cpu.yaml [--seeds 0 1 2] [--arms score rloo] [--flag value]

On generated arithmetic (`experiments.arithmetic`, seeded, disjoint splits) every arm starts from the same model,
sees the same prompts in the same order with the same seed and the same sample budget (rollouts × tokens per step,
number of steps), and is then evaluated once, greedy, with two attempts, on the evaluation split:

    base             the model as it is (not trained, so one evaluation serves every seed)
    rloo             TRL's own RLOOTrainer on the first turn only (twice the rollouts of one SCoRe attempt, so the
                     tokens per step match SCoRe's two attempts), evaluated with two attempts like the others
    score_no_stage1  SCoRe with stage_one_steps=0 (Stage II only)
    score            SCoRe, Stage I then Stage II
    score_alpha0     SCoRe without the bonus (alpha=0)
    rloo_then_score  the rloo arm's model (adapter merged), then SCoRe for max_steps more: is a self-correction phase
                     worth its tokens once turn 1 is strong?
    rloo_2n          the same rloo model, then RLOO for max_steps more: 2N RLOO steps, at the same sampled tokens as
                     rloo_then_score and with the same restart (a fresh LoRA and schedule, the KL to the rloo model)

The continuation arms need the same seed's rloo arm (its adapter, kept in work_dir). With the test split, every arm is
also scored on the transfer set (`experiments.transfer`: the test facts in phrasings the generator never uses).

Files: results_dir/base/ and results_dir/seed<S>/<arm>/ hold records.jsonl (every problem, both attempts and rewards;
resumable), summary.json, transfer/ (the same for the transfer set), log_history.json (the trainer's logged metrics
per step) and run.json (settings, wall times, hardware, and the provenance: commit and whether the tree was dirty,
package versions, the exact command, peak RSS). Trained adapters stay in work_dir/seed<S>/<arm>/adapter, so that
`score-eval --adapter` can score them on other data. At the end, from every finished evaluation in results_dir:
results.md (per seed, pooled over seeds with two-level bootstrap intervals, paired differences, the targets, the
transfer set; `experiments.pooled`), curves.png (training reward, and how often the second attempt changes its text
and its answer, against step; mean over seeds) and comparison.png (the first seed's table). Each chosen arm is run
afresh, replacing its old results; with `--resume true` an arm (and seed) whose summary.json exists is kept, so a
stopped run continues. SIGTERM (or SIGUSR1) during training saves a checkpoint after the step in progress and ends
the run with status 75, unevaluated; `--resume true` then continues that arm from its checkpoint.
"""

import dataclasses
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from score_trl.cli.common import parse, provenance, set_cpu_threads


ARMS = ("base", "rloo", "score_no_stage1", "score", "score_alpha0", "rloo_then_score", "rloo_2n")
# The feedback control (recipes/reproduce/smollm2_feedback.yaml, experiments.feedback_control): SCoRe trained with a
# verdict on each attempt in its correction turn
FEEDBACK_ARMS = ("score_verdict",)
CONTINUED = ("rloo_then_score", "rloo_2n")  # start from the same seed's rloo model
# Each arm is the recipe plus these overrides: (trainer, SCoReConfig fields). base is not trained.
ARM_OVERRIDES = {
    "rloo": ("rloo", {}),
    "rloo_2n": ("rloo", {}),
    "score": ("score", {}),
    "score_no_stage1": ("score", {"stage_one_steps": 0}),
    "score_alpha0": ("score", {"alpha": 0.0}),
    "rloo_then_score": ("score", {}),
    "score_verdict": ("score", {"correction_feedback": "verdict"}),
}
# The training settings RLOOTrainer shares with SCoReTrainer, taken from the recipe's SCoReConfig for the rloo arms
# (every other RLOOConfig field keeps TRL's default); RLOO gets twice the rows per step, so that its tokens per step
# match SCoRe's two attempts
RLOO_SHARED = ("seed", "max_steps", "learning_rate", "num_generations", "max_completion_length", "temperature", "beta",
               "disable_dropout", "use_cpu", "bf16", "gradient_checkpointing", "logging_steps", "report_to",
               "save_strategy", "log_completions", "model_init_kwargs")  # fmt: skip


@dataclass
class ReproduceArguments:
    """What the reproduction runs besides training: the arms, the seeds, the generated data and the evaluation. The
    recipe (recipes/reproduce/*.yaml) also holds the training settings every arm shares, read by score-train's own
    parser into ScoreScriptArguments, SCoReConfig and ModelConfig; each arm is those plus `ARM_OVERRIDES`."""

    arms: list[str] = field(
        default_factory=lambda: list(ARMS), metadata={"help": f"Arms to run, of {ARMS + FEEDBACK_ARMS}."}
    )
    results_dir: str = field(default="docs/results", metadata={"help": "Where tables, curves and records go."})
    work_dir: str = field(default="outputs/reproduce", metadata={"help": "Generated data and trained adapters."})
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue a stopped run: keep arms that already have a summary.json in results_dir, and resume an "
            "arm whose training a preemption signal stopped from its newest complete checkpoint in work_dir."
        },
    )
    eval_split: str = field(
        default="test",
        metadata={"help": "validation (to choose settings) or test (once per arm, with the chosen settings)."},
    )
    problem_seed: int = field(default=0, metadata={"help": "Seed of the problem generator (fixes the splits)."})
    n_test: int = field(default=320, metadata={"help": "Facts in the test split (one question each)."})
    n_validation: int = field(default=120, metadata={"help": "Facts in the validation split (one question each)."})
    two_choices: bool = field(
        default=False,
        metadata={
            "help": "Offer each question's answer and one distractor ('What is 7 + 12? Is it 19 or 21?'): after the "
            "verdict 'incorrect' the other choice is right (issue 32's positive control). Same facts and splits."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Training seeds (sampling, data order, LoRA init); every trained arm runs once per seed."},
    )
    n_transfer: int = field(
        default=160, metadata={"help": "Rephrased test facts in the transfer set (0: no transfer evaluation)."}
    )
    eval_batch_size: int = field(default=40, metadata={"help": "Problems per generation batch in the evaluation."})
    eval_feedback: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Evaluate every arm once per correction_feedback given (none, verdict): none in the arm's folder, "
            "others in its feedback_<mode>/ subfolder. More than none writes the feedback control's report."
        },
    )


@dataclass
class Setup:
    """A parsed reproduction recipe: the reproduction's own arguments and the training settings every arm shares."""

    args: ReproduceArguments
    script: object  # ScoreScriptArguments: the model source (gguf_file, chat_template) and eval_max_new_tokens
    training: object  # SCoReConfig
    model: object  # ModelConfig: dtype and LoRA

    @property
    def use_cpu(self) -> bool:
        return self.training.use_cpu


def parse_args(argv: list[str] | None = None) -> Setup:
    """The recipe given first (or with --config) and command-line overrides, on score-train's parser."""
    from trl import ModelConfig

    from score_trl.cli.train import ScoreScriptArguments
    from score_trl.config import SCoReConfig

    return Setup(*parse((ReproduceArguments, ScoreScriptArguments, SCoReConfig, ModelConfig), argv))


def hardware() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"CPU only: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"


def load(setup: Setup):
    """(model path, tokenizer, {split: dataset}) from the recipe; with the test split, also "transfer"."""
    from score_trl.data import load_score_dataset
    from score_trl.models import resolve_model

    from .arithmetic import write_splits
    from .transfer import write_transfer

    args, script = setup.args, setup.script
    path, tokenizer = resolve_model(setup.model.model_name_or_path, script.gguf_file, script.chat_template)
    data_dir = Path(args.work_dir) / "data"
    files = write_splits(data_dir, seed=args.problem_seed, n_test=args.n_test, n_validation=args.n_validation,
                         two_choices=args.two_choices)  # fmt: skip
    if args.eval_split == "test" and args.n_transfer > 0:  # test facts: never looked at while choosing settings
        files["transfer"] = write_transfer(
            data_dir / "transfer.jsonl",
            seed=args.problem_seed,
            n_test=args.n_test,
            n_validation=args.n_validation,
            limit=args.n_transfer,
        )
    plain = script.plain_prompt_template  # base models: plain-text prompts instead of a chat template
    data = {
        name: load_score_dataset(str(file), task="arithmetic", tokenizer=tokenizer, plain_template=plain)
        for name, file in files.items()
    }
    return path, tokenizer, data


def arm_dirs(args: ReproduceArguments, arm: str, seed: int) -> tuple[Path, Path]:
    """(results folder, work folder) of one arm and seed; the untrained base has one of each."""
    where = Path("base") if arm == "base" else Path(f"seed{seed}") / arm
    return Path(args.results_dir) / where, Path(args.work_dir) / where


def start_model(arm: str, setup: Setup, seed: int, path: str, tokenizer) -> str:
    """The model an arm trains from: the base model, or for the continuation arms the same seed's rloo model with
    its adapter merged (built once, in work_dir/seed<S>/rloo/merged)."""
    from score_trl.models import default_dtype, load_for_generation

    if arm not in CONTINUED:
        return path
    work = arm_dirs(setup.args, "rloo", seed)[1]
    merged = work / "merged"
    if (merged / "config.json").is_file():
        return str(merged)
    if not (work / "adapter" / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{arm} (seed {seed}) continues the rloo arm, but {work / 'adapter'} has no adapter: run the rloo arm for "
            f"seed {seed} first (arms run in the order given), e.g. --arms rloo {arm}."
        )
    dtype = setup.model.dtype or default_dtype(setup.use_cpu)
    model = load_for_generation(path, dtype, str(work / "adapter"), cpu=True, merge=True)
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    return str(merged)


def arm_config(arm: str, setup: Setup, seed: int):
    """(config, trainer class) of one arm for one seed: the recipe's SCoReConfig with the arm's overrides, or for the
    rloo arms an RLOOConfig with the shared settings (`RLOO_SHARED`) and twice the rows."""
    from trl import RLOOConfig, RLOOTrainer

    from score_trl.models import default_dtype
    from score_trl.trainer import SCoReTrainer

    trainer, overrides = ARM_OVERRIDES[arm]
    dtype = setup.model.dtype or default_dtype(setup.use_cpu)
    # generation_batch_size is derived from steps_per_generation when the config is built; replace() rebuilds it
    config = dataclasses.replace(
        setup.training, seed=seed, output_dir=str(arm_dirs(setup.args, arm, seed)[1]), generation_batch_size=None,
        model_init_kwargs={"dtype": dtype, **(setup.training.model_init_kwargs or {})}, **overrides,
    )  # fmt: skip
    if trainer == "score":
        return config, SCoReTrainer
    shared = {name: getattr(config, name) for name in RLOO_SHARED}
    rows = 2 * config.per_device_train_batch_size
    rloo = stop_string_rloo(config.stop_strings) if config.stop_strings else RLOOTrainer
    return RLOOConfig(output_dir=config.output_dir, per_device_train_batch_size=rows, **shared), rloo


def stop_string_rloo(stop_strings: list[str]):
    """TRL's RLOOTrainer with each completion cut where SCoReTrainer cuts an attempt (`cut_at_stop_strings`): the
    same stop rule for every arm of a base-model run. RLOOTrainer passes no tokenizer to `generate`, so transformers'
    own `stop_strings` cannot run there; this is its generation hook plus the cut, nothing else."""
    from trl import RLOOTrainer

    from score_trl.generation import cut_at_stop_strings

    class StopStringRLOOTrainer(RLOOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields)
            return cut_at_stop_strings(completion_ids, self.processing_class, stop_strings)

    return StopStringRLOOTrainer


def train_arm(arm: str, setup: Setup, seed: int, start: str, tokenizer, train_dataset, reward):
    """Train one arm for one seed from the model at `start`; returns its trainer (the trained PEFT model is
    trainer.model). A preemption signal (`preemption_signals`, SIGTERM by default) saves a checkpoint after the step
    in progress and ends the process with status 75 before any evaluation; `--resume true` continues from the newest
    complete checkpoint in the arm's work folder. Without resuming, an arm starts afresh and old checkpoints go."""
    from trl import get_peft_config

    from score_trl.checkpoints import last_complete_checkpoint
    from score_trl.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback

    config, trainer_class = arm_config(arm, setup, seed)
    work = Path(config.output_dir)
    resume = last_complete_checkpoint(work) if setup.args.resume else None
    if resume is None:
        for old in work.glob("checkpoint-*"):
            shutil.rmtree(old)
    trainer = trainer_class(
        model=start,
        reward_funcs=[reward],
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(setup.model),
    )
    callback = getattr(trainer, "_preemption", None)  # SCoReTrainer adds it itself
    if callback is None and setup.training.preemption_signals:  # the rloo arms: the same stop-and-save rule
        callback = PreemptionCallback(setup.training.preemption_signals)
        trainer.add_callback(callback)
    if resume:
        print(f"[reproduce] {arm} (seed {seed}): resuming from {resume}", flush=True)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if callback is not None:
            callback.restore()  # on_train_end does not run when training raises
    if callback is not None and callback.preempted_at is not None:
        print(f"[reproduce] {arm} (seed {seed}): preempted, checkpoint-{callback.preempted_at} saved in {work}; "
              "not evaluated. Rerun with --resume true to continue.", flush=True)  # fmt: skip
        sys.exit(PREEMPTED_EXIT_CODE)
    return trainer


def run_arm(arm: str, setup: Setup, seed: int, path: str, tokenizer, data: dict) -> dict:
    """Train (unless base) and evaluate one arm for one seed; writes its files and returns its summary."""
    from score_trl.generation import TransformersGenerator
    from score_trl.models import default_dtype, load_for_generation
    from score_trl.rewards import numeric_reward

    args = setup.args
    if setup.use_cpu:
        set_cpu_threads()
    out, work = arm_dirs(args, arm, seed)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    start = start_model(arm, setup, seed, path, tokenizer)
    if arm == "base":
        model = load_for_generation(path, setup.model.dtype or default_dtype(setup.use_cpu), cpu=setup.use_cpu)
        log_history = []
    else:
        trainer = train_arm(arm, setup, seed, start, tokenizer, data["train"], numeric_reward)
        model, log_history = trainer.model, trainer.state.log_history
        model.save_pretrained(work / "adapter")  # kept (not committed) for score-eval --adapter on other data
        shutil.rmtree(work / "merged", ignore_errors=True)  # a retrained rloo arm: its continuations rebuild it
        (out / "log_history.json").write_text(json.dumps(log_history, indent=1))
    trained = time.time()
    generator = TransformersGenerator(model, tokenizer, max_new_tokens=setup.script.eval_max_new_tokens,
                                      stop_strings=setup.training.stop_strings)  # fmt: skip
    eval_seconds, summaries = {}, {}
    for mode in args.eval_feedback:  # none first: the arm's own folder, then feedback_<mode>/
        started_eval = time.time()
        folder = out if mode == "none" else out / f"feedback_{mode}"
        summaries[mode] = evaluate_into(folder, generator, tokenizer, data[args.eval_split], numeric_reward, setup,
                                        arm, mode)  # fmt: skip
        eval_seconds[mode] = round(time.time() - started_eval, 1)
    finished, summary = time.time(), summaries["none"]
    if "transfer" in data:
        evaluate_into(out / "transfer", generator, tokenizer, data["transfer"], numeric_reward, setup, arm)
    run = {
        "arm": arm,
        "seed": None if arm == "base" else seed,
        "start_model": start,
        "settings": settings_of(setup, arm, seed),
        "eval_split": args.eval_split,
        "train_seconds": round(trained - started, 1),
        "eval_seconds": round(finished - trained, 1),
        "eval_seconds_by_feedback": eval_seconds,
        "transfer_seconds": round(time.time() - finished, 1),
        "wall_seconds": round(time.time() - started, 1),
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **provenance(),  # commit (and whether the tree was dirty), versions, command, peak RSS
    }
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    (out / "summary.json").write_text(json.dumps({"label": arm, **summary}, indent=2))  # last: marks the arm done
    return summary


def settings_of(setup: Setup, arm: str, seed: int) -> dict:
    """What run.json records of the settings: the reproduction's, the model source's, the arm's trainer config and
    the LoRA settings."""
    training = None if arm == "base" else arm_config(arm, setup, seed)[0].to_dict()
    return {"reproduce": asdict(setup.args), "script": asdict(setup.script), "training": training,
            "model": asdict(setup.model)}  # fmt: skip


def evaluate_into(out: Path, generator, tokenizer, dataset, reward, setup: Setup, label: str,
                  feedback: str = "none") -> dict:  # fmt: skip
    """Greedy two-attempt evaluation with records.jsonl in `out`, the correction turn carrying `feedback`; a transfer
    or feedback folder also gets its summary.json (the arm's own is written last, as its done mark)."""
    from score_trl.evaluation import evaluate

    out.mkdir(parents=True, exist_ok=True)
    summary = evaluate(
        generator,
        tokenizer,
        dataset,
        [reward],
        output_jsonl=out / "records.jsonl",
        batch_size=setup.args.eval_batch_size,
        progress=False,
        correction_feedback=feedback,
        plain_correction_format=setup.training.plain_correction_format,  # used only with plain-text prompts
    )
    if out.name == "transfer" or feedback != "none":
        (out / "summary.json").write_text(json.dumps({"label": label, **summary}, indent=2))
    return summary


def main(setup: Setup) -> Path:
    args = setup.args
    unknown = sorted(set(args.arms) - set(ARMS + FEEDBACK_ARMS))
    if unknown:
        raise ValueError(f"Unknown arms {unknown}: choose from {list(ARMS + FEEDBACK_ARMS)}.")
    if args.eval_feedback[:1] != ["none"] or not set(args.eval_feedback) <= {"none", "verdict"}:
        raise ValueError(f"eval_feedback={args.eval_feedback}: start with none, then verdict (e.g. none verdict).")
    if args.eval_split not in ("validation", "test"):
        raise ValueError(f"eval_split={args.eval_split!r}: use validation or test.")
    if not args.seeds:
        raise ValueError("seeds is empty: give at least one training seed, e.g. --seeds 0 1 2.")
    if args.two_choices and args.n_transfer > 0 and args.eval_split == "test":
        raise ValueError("two_choices with n_transfer > 0: the transfer set has no choices; set n_transfer: 0.")
    output = Path(args.results_dir)
    path, tokenizer, data = load(setup)
    for seed in args.seeds:
        for arm in args.arms:
            if arm == "base" and seed != args.seeds[0]:
                continue  # not trained: one evaluation serves every seed
            out = arm_dirs(args, arm, seed)[0]
            if args.resume and (out / "summary.json").is_file():
                print(f"[reproduce] {arm} (seed {seed}): done before, kept ({out / 'summary.json'})")
                continue
            shutil.rmtree(out, ignore_errors=True)  # no stale records.jsonl resumed into a new run
            print(f"[reproduce] {arm} (seed {seed}): training and evaluating", flush=True)
            run_arm(arm, setup, seed, path, tokenizer, data)
            write_reports(output, args)
    write_reports(output, args)
    print((output / "results.md").read_text())
    return output


def write_reports(output: Path, args: ReproduceArguments) -> None:
    """results.md, curves.png and comparison.png from every finished evaluation in output (all seeds); for the
    feedback control (eval_feedback beyond none), its own report (`experiments.feedback_control`)."""
    from score_trl.cli.report import plot

    if args.eval_feedback != ["none"]:
        from .feedback_control import write_report

        write_report(output)
        return

    from .curves import plot_curves
    from .pooled import results_markdown

    (output / "results.md").write_text(results_markdown(output, list(ARMS), args.eval_split) + runs_markdown(output))
    histories: dict[str, list] = {}
    for arm in ARMS[1:]:
        for folder in sorted(output.glob(f"seed[0-9]*/{arm}")):
            if (folder / "summary.json").is_file():
                histories.setdefault(arm, []).append(json.loads((folder / "log_history.json").read_text()))
    if histories:
        plot_curves(histories, output / "curves.png")
    first = [arm_dirs(args, arm, args.seeds[0])[0] for arm in ARMS]
    done = [(arm, d) for arm, d in zip(ARMS, first, strict=True) if (d / "summary.json").is_file()]
    if done:
        summaries = [json.loads((d / "summary.json").read_text()) for _, d in done]
        plot(summaries, [arm for arm, _ in done], output / "comparison.png")


def runs_markdown(output: Path) -> str:
    """One row per finished arm and seed, from its run.json: times, date, hardware, commit, peak RSS."""
    files = [output / "base" / "run.json", *sorted(output.glob("seed[0-9]*/*/run.json"))]
    runs = [json.loads(p.read_text()) for p in files if p.is_file()]
    lines = [
        "",
        "## Runs (from each run.json)",
        "",
        "| arm | seed | train (s) | eval (s) | transfer (s) | date | hardware | commit | dirty | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        cells = [r["arm"], r.get("seed"), r["train_seconds"], r["eval_seconds"], r.get("transfer_seconds", "–")]
        cells += [r["date"], r["hardware"], r.get("commit", "?")[:7], r.get("dirty", "?"), r.get("peak_rss_mib", "?")]
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def cli(argv=None):
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
