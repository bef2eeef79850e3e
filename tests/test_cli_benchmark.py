"""The benchmark script in its smallest configurations: both arms run, generate the same tokens, and it reports."""

import json

import pytest

from score_trl.cli.benchmark import cli


def check(result, rows, tokens):
    for arm in ("SCoRe", "RLOO"):
        figures = result["arms"][arm]
        assert len(figures["steps"]) == 2 and figures["step_min_s"] > 0 and figures["peak_memory_gib"] > 0
        # Every completion runs to full length: rows x 2 attempts x tokens == rows x (2 x tokens)
        assert figures["generated_tokens_per_step"] == rows * 2 * tokens
    assert result["ratio"] == pytest.approx(
        result["arms"]["SCoRe"]["step_median_s"] / result["arms"]["RLOO"]["step_median_s"]
    )
    phases = result["phases"]
    assert {"generate attempt 1", "generate attempt 2", "forward (grad)", "backward", "rewards"} <= set(phases)
    assert phases["generate attempt 2"]["RLOO"]["median_s"] == 0.0  # RLOO generates once, at twice the length
    assert phases["log-probs (no grad)"]["SCoRe"]["median_s"] > 0  # the reference pass


def test_benchmark_on_a_local_model(tmp_path, tiny_model_dir, capsys):
    output = tmp_path / "bench.json"
    cli(["--model", tiny_model_dir, "--rows", "4", "--num_generations", "2", "--tokens", "4", "--steps", "2",
         "--warmup", "1", "--lora_r", "4", "--exact_memory", "--output_json", str(output)])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith("ratio SCoRe/RLOO: ")
    assert "| SCoRe |" in printed and "| RLOO |" in printed and "| generate attempt 2 |" in printed
    result = json.loads(output.read_text())
    check(result, rows=4, tokens=4)
    assert all(result["arms"][arm]["step_memory_gib"] > 0 for arm in ("SCoRe", "RLOO"))  # RSS follows live memory


@pytest.mark.real_model
def test_gpu_mode_runs_on_cpu_in_its_smallest_configuration(tmp_path):
    # The gemma-2-2b architecture (random weights) shrunk to two tiny layers, with Gemma's real tokenizer
    output = tmp_path / "bench.json"
    cli(["--model", "gemma2-2b", "--tiny", "--rows", "4", "--num_generations", "2", "--tokens", "4", "--steps", "2",
         "--warmup", "0", "--lora_r", "4", "--output_json", str(output)])  # fmt: skip
    result = json.loads(output.read_text())
    check(result, rows=4, tokens=4)
    assert result["arms"]["SCoRe"]["step_memory_gib"] is None  # RSS is a high-water mark without --exact_memory
