"""Self-correction evaluation: metric arithmetic, JSONL resume after a real kill, end-to-end runs, reports."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from score_trl.cli.evaluate import cli
from score_trl.cli.report import markdown_table
from score_trl.evaluation import summarize
from score_trl.rewards import math_answer_reward
from score_trl.scoring import graded_answer


TESTS = Path(__file__).resolve().parent
GSM8K_ROWS = [
    {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"{a} + {b}\n#### {a + b}",
    }
    for a, b in [(2, 3), (4, 4), (7, 1), (3, 9), (5, 5), (6, 2), (8, 3), (1, 1)]
]


def record(index, r1, r2, a1="x", a2="y"):
    return {"index": index, "sample": 0, "reward_1": r1, "reward_2": r2, "attempt_1": a1, "attempt_2": a2}


def test_metrics_on_hand_built_transitions():
    records = [
        record(0, 0.0, 1.0),  # incorrect -> correct
        record(1, 0.0, 1.0),  # incorrect -> correct
        record(2, 1.0, 0.0),  # correct -> incorrect
        record(3, 1.0, 1.0, "same", "same"),
        record(4, 0.0, 0.0, "abc", "abd"),
        record(5, None, 1.0),  # unscorable: left out, counted
    ]
    s = summarize(records)
    assert (s["n"], s["unscorable"]) == (5, 1)
    assert s["accuracy_t1"] == pytest.approx(2 / 5) and s["accuracy_t2"] == pytest.approx(3 / 5)
    assert s["incorrect_to_correct"] == pytest.approx(2 / 5) and s["correct_to_incorrect"] == pytest.approx(1 / 5)
    assert s["delta"] == s["incorrect_to_correct"] - s["correct_to_incorrect"]
    assert s["no_edit"] == pytest.approx(1 / 5)
    assert s["mean_edit_distance"] == pytest.approx((1 + 1 + 1 + 0 + 1) / 5)
    assert s["delta_ci"][0] <= s["delta"] <= s["delta_ci"][1]


def test_metrics_for_three_attempts_by_hand():
    def rec(index, rewards, texts=("a", "b", "c")):
        out = {"index": index, "sample": 0}
        for t, (r, text) in enumerate(zip(rewards, texts, strict=True), start=1):
            out |= {f"reward_{t}": r, f"attempt_{t}": text}
        return out

    records = [
        rec(0, (0.0, 1.0, 1.0)),  # fixed at t2, kept
        rec(1, (1.0, 0.0, 1.0)),  # broken at t2, fixed again at t3
        rec(2, (1.0, 1.0, 0.0), ("a", "a", "b")),  # undone by the third attempt
        rec(3, (0.0, 0.0, 0.0), ("a", "b", "b")),
        rec(4, (0.0, None, 1.0)),  # unscorable
    ]
    s = summarize(records)
    assert (s["n"], s["unscorable"], s["num_attempts"]) == (4, 1, 3)
    assert [s[f"accuracy_t{t}"] for t in (1, 2, 3)] == pytest.approx([0.5, 0.5, 0.5])
    # t1 -> t3: i->c row 0, c->i row 2
    assert (s["incorrect_to_correct"], s["correct_to_incorrect"], s["delta"]) == pytest.approx((0.25, 0.25, 0.0))
    for pair in ("t1_t2", "t2_t3"):
        assert (s[f"incorrect_to_correct_{pair}"], s[f"correct_to_incorrect_{pair}"]) == pytest.approx((0.25, 0.25))
    # last vs previous attempt: only row 3 repeats itself; edit distances 1, 1, 1, 0
    assert s["no_edit"] == pytest.approx(0.25) and s["mean_edit_distance"] == pytest.approx(0.75)
    table = markdown_table([s, summarize([record(0, 0.0, 1.0)])], ["K=3", "K=2"])
    assert "| Accuracy@t3 | 50.0 [" in table and table.count("–") == 3  # the K=2 run: no t3, no (t2,t3) pair
    assert "| Δi→c(t2,t3) | 25.0 | – |" in table


def write_gsm8k(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return path


def eval_args(model_dir, data, out, *extra):
    return ["--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", str(out),
            "--max_new_tokens", "12", "--dtype", "float32", *extra]  # fmt: skip


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and width > 100 and height > 100


def test_sampling_draws_what_rloo_training_draws(tiny_model, tokenizer):
    """`do_sample` samples the distribution RLOOTrainer samples in training (its generation kwargs with RLOOConfig's
    defaults: top_k=0, top_p=1.0), token for token under one seed. Left unset, generate() would cut the distribution to
    transformers' default top_k=50: a sampled evaluation or temperature probe would then measure another sampler."""
    import dataclasses

    from transformers import GenerationConfig, set_seed
    from trl import RLOOConfig

    from score_trl.generation import TransformersGenerator, cut_at_stop, sample_padded

    defaults = {f.name: f.default for f in dataclasses.fields(RLOOConfig)}
    messages = [{"role": "user", "content": f"What is {a} + 3?"} for a in range(8)]
    prompts = [tokenizer.apply_chat_template([m], add_generation_prompt=True, return_dict=False) for m in messages]
    generator = TransformersGenerator(tiny_model, tokenizer, max_new_tokens=12, do_sample=True, temperature=1.3)
    rloo_config = GenerationConfig(  # as rloo_trainer.py builds it for transformers generation
        max_new_tokens=12,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=generator.stop_ids,
        temperature=1.3,
        top_p=defaults["top_p"],
        top_k=defaults["top_k"],
        min_p=defaults["min_p"],
        repetition_penalty=defaults["repetition_penalty"],
    )
    set_seed(0)
    ours = generator(prompts)
    set_seed(0)
    sampled = sample_padded(tiny_model.eval(), prompts, rloo_config, tokenizer.pad_token_id)
    theirs = cut_at_stop(sampled, generator.stop_ids)
    assert ours == theirs
    set_seed(0)
    truncated = TransformersGenerator(tiny_model, tokenizer, 12, do_sample=True, temperature=1.3, top_k=50)(prompts)
    assert truncated != ours  # the cut is visible: the comparison above can fail


def test_end_to_end_tiny_model_on_gsm8k_rows(tmp_path, tiny_model_dir):
    data = write_gsm8k(tmp_path / "gsm8k.jsonl")
    cli(eval_args(tiny_model_dir, data, tmp_path / "run", "--batch_size", "3", "--label", "tiny"))
    records = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(GSM8K_ROWS)))
    assert all(r["reward_1"] in (0.0, 1.0) and r["reward_2"] in (0.0, 1.0) for r in records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["label"] == "tiny" and summary["n"] == len(GSM8K_ROWS)
    # "answer changed" reads what the task's reward grades (here the anchored answer, math's)
    graded = summarize(records, answer_of=graded_answer([math_answer_reward]))
    assert summary == {"label": "tiny", "correction_feedback": "none", **json.loads(json.dumps(graded))}
    assert "| Accuracy@t1 |" in (tmp_path / "run" / "table.md").read_text()
    assert is_png(tmp_path / "run" / "plot.png")

    # Continuous batching backend: same protocol, a complete run
    cli(eval_args(tiny_model_dir, data, tmp_path / "cb", "--backend", "continuous_batching", "--limit", "3"))
    assert json.loads((tmp_path / "cb" / "summary.json").read_text())["n"] == 3

    # Comparison of the two runs
    cli(["--compare", str(tmp_path / "run"), str(tmp_path / "cb"), "--labels", "padded", "paged",
         "--output_dir", str(tmp_path / "cmp")])  # fmt: skip
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| metric | padded | paged |" in table and "| problems | 8 | 3 |" in table
    assert is_png(tmp_path / "cmp" / "comparison.png")

    # Three attempts: every record has three, the report and a comparison with the two-attempt run show them
    cli(eval_args(tiny_model_dir, data, tmp_path / "k3", "--num_attempts", "3", "--limit", "4"))
    records = [json.loads(line) for line in (tmp_path / "k3" / "records.jsonl").read_text().splitlines()]
    assert all(r["reward_3"] in (0.0, 1.0) and isinstance(r["attempt_3"], str) for r in records)
    summary = json.loads((tmp_path / "k3" / "summary.json").read_text())
    assert summary["num_attempts"] == 3
    assert {"incorrect_to_correct_t1_t2", "correct_to_incorrect_t2_t3"} <= set(summary)  # score_trl.stats' keys
    assert is_png(tmp_path / "k3" / "plot.png")
    cli(["--compare", str(tmp_path / "run"), str(tmp_path / "k3"), "--output_dir", str(tmp_path / "cmp3")])
    assert "| Accuracy@t3 | – |" in (tmp_path / "cmp3" / "comparison.md").read_text()


@pytest.mark.slow
def test_killed_evaluation_resumes_without_duplicates(tmp_path, tiny_model_dir):
    data = write_gsm8k(tmp_path / "gsm8k.jsonl")
    # A reward that takes a moment per batch, so the process can be killed between two flushed batches
    args = eval_args(tiny_model_dir, data, tmp_path / "run", "--batch_size", "1",
                     "--reward_funcs", "score_trl.rewards.math_answer_reward", "slow_reward.pause")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(TESTS), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "score_trl.cli.evaluate", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "run" / "records.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if records.is_file() and len(records.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(records.read_text().splitlines())
    assert 3 <= done_before < len(GSM8K_ROWS), "the run must be killed part-way"

    subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
    resumed = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["index"] for r in resumed) == list(range(len(GSM8K_ROWS)))  # each problem exactly once

    # Same summary as an uninterrupted (greedy, deterministic) run
    cli(eval_args(tiny_model_dir, data, tmp_path / "fresh", "--batch_size", "1"))
    fresh = json.loads((tmp_path / "fresh" / "summary.json").read_text())
    resumed_summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("n", "accuracy_t1", "accuracy_t2", "delta", "incorrect_to_correct", "correct_to_incorrect"):
        assert resumed_summary[key] == fresh[key], key


def test_lora_adapter_on_its_base(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # A real adapter whose B matrices are non-zero, so that it changes the model's outputs
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    data = write_gsm8k(tmp_path / "gsm8k.jsonl")
    cli(eval_args(tiny_model_dir, data, tmp_path / "base", "--limit", "4"))
    cli(eval_args(tiny_model_dir, data, tmp_path / "tuned", "--limit", "4", "--adapter", str(tmp_path / "adapter")))
    base = [json.loads(line) for line in (tmp_path / "base" / "records.jsonl").read_text().splitlines()]
    tuned = [json.loads(line) for line in (tmp_path / "tuned" / "records.jsonl").read_text().splitlines()]
    assert [r["attempt_1"] for r in base] != [r["attempt_1"] for r in tuned]  # the adapter was applied
    assert json.loads((tmp_path / "tuned" / "summary.json").read_text())["label"] == "adapter"
