"""The launch surface: recipes through the real parser, accelerate configs, `accelerate launch` end to end with resume,
and metrics read back from a real wandb offline run."""

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from trl import ModelConfig

from score_trl import SCoReTrainer
from score_trl.cli.train import ScoreScriptArguments, check_launch, parse_args

from conftest import TOY_WORDS, make_args, toy_dataset, toy_question, word_reward


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "*.yaml")))
ACCELERATE_CONFIGS = sorted(glob.glob(str(ROOT / "recipes" / "accelerate_configs" / "*.yaml")))


@pytest.mark.parametrize("recipe", RECIPES, ids=[Path(r).name for r in RECIPES])
def test_recipes_parse_with_the_real_parser(recipe):
    # GPU recipes ask for bf16, which TrainingArguments refuses on a CPU-only machine: parse them as CPU runs. Every
    # key of the file still goes through TrlParser, which fails on unknown keys.
    script_args, training_args, model_args = parse_args([recipe, "--use_cpu", "true"])
    assert script_args.dataset_name
    assert model_args.model_name_or_path or script_args.gguf_file
    assert training_args.alpha == 10.0 and training_args.beta == 0.01 and training_args.beta2 == 0.1
    assert 0 < training_args.stage_one_steps < training_args.max_steps


def test_gemma_recipe_is_the_paper_setup():
    script_args, training_args, model_args = parse_args([str(ROOT / "recipes" / "gemma2b.yaml"), "--use_cpu", "true"])
    assert model_args.model_name_or_path == "google/gemma-2-2b-it"
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4" and model_args.use_bnb_nested_quant
    assert model_args.use_peft and model_args.lora_target_modules in ("all-linear", ["all-linear"])
    assert (training_args.learning_rate, training_args.temperature) == (5e-6, 1.0)
    assert training_args.report_to == ["wandb"] and training_args.log_completions
    assert os.environ["WANDB_PROJECT"] == "score-trl"  # from the recipe's env block


def test_unknown_recipe_key_fails(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((ROOT / "recipes" / "demo_smollm2.yaml").read_text() + "\nnot_a_field: 3\n")
    with pytest.raises(ValueError, match="Unknown arguments from config file: \\['--not_a_field', '3'\\]"):
        parse_args([str(recipe)])


def test_command_line_overrides_the_recipe():
    script_args, training_args, _ = parse_args([str(ROOT / "recipes" / "demo_smollm2.yaml"), "--max_steps", "2"])
    assert training_args.max_steps == 2 and script_args.compare_before_after == 32
    assert training_args.num_attempts == 2 and training_args.disable_dropout
    _, training_args, _ = parse_args([str(ROOT / "recipes" / "demo_smollm2.yaml"), "--num_attempts", "3"])
    assert training_args.num_attempts == 3
    with pytest.raises(ValueError, match="num_attempts=1: SCoRe needs a first attempt and at least one correction"):
        parse_args([str(ROOT / "recipes" / "demo_smollm2.yaml"), "--num_attempts", "1"])


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=[Path(c).name for c in ACCELERATE_CONFIGS])
def test_accelerate_configs_load(config):
    loaded = load_config_from_file(config)
    expected = {
        "single_gpu.yaml": "NO",
        "multi_gpu.yaml": "MULTI_GPU",
        "zero2.yaml": "DEEPSPEED",
        "zero3.yaml": "DEEPSPEED",
    }
    assert str(loaded.distributed_type).split(".")[-1] == expected[Path(config).name]
    if "zero" in config:
        assert loaded.deepspeed_config["zero_stage"] == int(Path(config).stem[-1])


@pytest.mark.parametrize(
    "model_kwargs, plugin, use_cpu, match",
    [
        (dict(load_in_4bit=True, use_peft=False), None, False, "set use_peft: true"),
        (dict(load_in_4bit=True, use_peft=True), SimpleNamespace(zero_stage=3), False, "ZeRO-3 cannot shard"),
        (dict(load_in_8bit=True, use_peft=True), None, True, "needs a GPU"),
    ],
)
def test_impossible_combinations_are_refused_up_front(model_kwargs, plugin, use_cpu, match):
    # DeepSpeed is not installed on CPU machines, so its plugin is stood in for by the one attribute checked
    training_args = SimpleNamespace(deepspeed_plugin=plugin, use_cpu=use_cpu)
    with pytest.raises(ValueError, match=match):
        check_launch(ScoreScriptArguments(dataset_name="d"), training_args, ModelConfig("m", **model_kwargs))


def write_toy_data(path: Path) -> Path:
    rows = [{"question": toy_question(w), "correct_answer": w} for w in TOY_WORDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def accelerate_launch(*args, cwd=ROOT):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *map(str, args)]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_script_end_to_end_and_resume(tmp_path, tiny_model_dir):
    recipe = {
        "model_name_or_path": tiny_model_dir,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["all-linear"],
        "dataset_name": str(write_toy_data(tmp_path / "toy.jsonl")),
        "compare_before_after": 4,
        "eval_max_new_tokens": 6,
        "stage_one_steps": 1,
        "max_steps": 3,
        "num_generations": 2,
        "per_device_train_batch_size": 4,
        "max_completion_length": 6,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "bf16": False,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "report_to": "none",
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = accelerate_launch(ROOT / "scripts" / "train_score.py", tmp_path / "recipe.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    card = (run / "README.md").read_text()
    assert "SCoRe" in card and "2409.12917" in card
    assert "Self-correction on 4 problems (greedy)" in result.stdout and "Accuracy@t2" in result.stdout
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["stage"] for h in state["log_history"] if "loss" in h] == [1.0, 2.0, 2.0]

    # Resume from the newest checkpoint in output_dir, one step further, in the same stage
    shutil.rmtree(run / "checkpoint-3")
    result = accelerate_launch(
        ROOT / "scripts" / "train_score.py", tmp_path / "recipe.yaml", "--resume_from_checkpoint", "last",
        "--max_steps", "4", "--compare_before_after", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [(h["step"], h["stage"]) for h in state["log_history"] if "loss" in h]
    assert steps == [(1, 1.0), (2, 2.0), (3, 2.0), (4, 2.0)]


@pytest.mark.slow
def test_script_exits_75_after_a_preemption(tmp_path, tiny_model_dir):
    # The library's train() returns after a preemption; the entry point ends the process with 75 ("try again later")
    recipe = {"model_name_or_path": tiny_model_dir, "dataset_name": str(write_toy_data(tmp_path / "toy.jsonl")),
              "stage_one_steps": 1, "max_steps": 200, "num_generations": 2, "per_device_train_batch_size": 4,
              "max_completion_length": 6, "use_cpu": True, "bf16": False, "logging_steps": 1, "report_to": "none",
              "output_dir": str(tmp_path / "run")}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    report = tmp_path / "steps.jsonl"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "SCORE_TRL_STEP_REPORT": str(report)}
    command = [sys.executable, str(ROOT / "scripts" / "train_score.py"), str(tmp_path / "recipe.yaml")]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (report.is_file() and report.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stderr[-3000:]
    (checkpoint,) = (tmp_path / "run").glob("checkpoint-*")
    assert "Preempted: " + checkpoint.name in stdout and not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_console_command_is_installed():
    # Console scripts are installed beside the interpreter (the venv need not be activated)
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([bin_dir / "score-train", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--stage_one_steps" in result.stdout and "--gguf_file" in result.stdout
    result = subprocess.run([bin_dir / "score-eval", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--compare" in result.stdout and "--adapter" in result.stdout


def read_wandb_history(run_file: Path, timeout: float = 60.0) -> list[dict]:
    """History rows of an offline wandb run, read from its .wandb file (a LevelDB-style log of protobuf records).
    wandb's writer process may still be flushing after `wandb.finish()` returns, so wait for the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        rows, finished = _wandb_records(run_file)
        if finished or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _wandb_records(run_file: Path) -> tuple[list[dict], bool]:
    from wandb.proto import wandb_internal_pb2

    data, block, header = run_file.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, pending, rows, finished = 7, b"", [], False
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if pos + header + length > len(data):  # still being written
            break
        chunk, pos = data[pos + header : pos + header + length], pos + header + length
        if kind in (2, 3):  # first / middle fragment
            pending += chunk
            continue
        if kind not in (1, 4):
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + chunk)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        if record.WhichOneof("record_type") == "exit":
            finished = True
    return rows, finished


def test_metrics_and_table_in_a_wandb_offline_run(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = make_args(
        tmp_path / "out", report_to=["wandb"], log_completions=True, run_name="score-offline-test", learning_rate=5e-6
    )
    trainer = SCoReTrainer(
        tiny_model_dir, word_reward, args=args, train_dataset=toy_dataset(8), processing_class=tokenizer
    )
    trainer.train()
    wandb.finish()

    [run_dir] = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    history = read_wandb_history(next(Path(run_dir).glob("run-*.wandb")))
    logged = [row for row in history if "train/turn2/reward" in row]
    assert [row["train/stage"] for row in logged] == [1.0, 2.0]
    keys = ["turn1/reward", "turn1/kl", "turn2/kl", "turn2/completions/mean_length", "self_correction/reward_delta"]
    keys += ["self_correction/incorrect_to_correct", "self_correction/correct_to_incorrect"]
    for key in keys:
        assert all(f"train/{key}" in row for row in logged), key
    # Same values as the trainer's own log history
    own = [h for h in trainer.state.log_history if "turn2/reward" in h]
    assert [row["train/turn2/reward"] for row in logged] == pytest.approx([h["turn2/reward"] for h in own])

    tables = sorted(glob.glob(str(Path(run_dir) / "files" / "media" / "table" / "completions_*.table.json")))
    assert tables
    table = json.loads(Path(tables[-1]).read_text())
    columns = table["columns"]
    for column in ("prompt", "attempt_1", "attempt_2", "reward_1", "reward_2", "advantage_1", "advantage_2"):
        assert column in columns
    assert len(table["data"]) == args.generation_batch_size
    first, second = columns.index("attempt_1"), columns.index("attempt_2")
    assert all(isinstance(row[first], str) and isinstance(row[second], str) for row in table["data"])
