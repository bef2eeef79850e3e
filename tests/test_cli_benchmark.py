"""The benchmark script in its smallest configurations: both arms run, generate the same tokens, and it reports."""

import importlib.util
import json

import pytest

from experiments.benchmark import cli


def check(result, rows, tokens, steps=2, score="SCoRe", rloo="RLOO"):
    for arm in (score, rloo):
        figures = result["arms"][arm]
        assert len(figures["steps"]) == steps and figures["step_min_s"] > 0 and figures["peak_memory_gib"] > 0
        # Every completion runs to full length: rows x 2 attempts x tokens == rows x (2 x tokens)
        assert figures["generated_tokens_per_step"] == rows * 2 * tokens
        generation = sum(per_arm[arm]["median_s"] for p, per_arm in result["phases"].items() if p.startswith("gen"))
        assert figures["decode_ms_per_step"] == pytest.approx(1000 * generation / (2 * tokens))
    ratio = result["ratios"][score.replace("SCoRe", "SCoRe/RLOO")]
    assert ratio == pytest.approx(result["arms"][score]["step_median_s"] / result["arms"][rloo]["step_median_s"])
    phases = result["phases"]
    assert {"generate attempt 1", "generate attempt 2", "forward (grad)", "backward", "rewards"} <= set(phases)
    assert phases["generate attempt 2"][rloo]["median_s"] == 0.0  # RLOO generates once, at twice the length
    assert phases["log-probs (no grad)"][score]["median_s"] > 0  # the reference pass


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


def test_generation_backends_side_by_side(tmp_path, tiny_model_dir, capsys):
    output = tmp_path / "bench.json"
    backends = ["generate", "static", "continuous_batching"]
    cli(["--model", tiny_model_dir, "--rows", "4", "--num_generations", "2", "--tokens", "4", "--steps", "1",
         "--warmup", "0", "--lora_r", "4", "--backends", *backends, "--output_json", str(output)])  # fmt: skip
    result = json.loads(output.read_text())
    for backend in backends:  # every backend generates the same number of tokens, in both arms
        check(result, rows=4, tokens=4, steps=1, score=f"SCoRe [{backend}]", rloo=f"RLOO [{backend}]")
    ratios = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [line.split(":")[0] for line in ratios] == [f"ratio SCoRe/RLOO [{b}]" for b in backends]
    # A SCoRe-only backend: no RLOO arm, no ratio
    cli(["--model", tiny_model_dir, "--rows", "4", "--num_generations", "2", "--tokens", "4", "--steps", "1",
         "--warmup", "0", "--lora_r", "4", "--backends", "generate", "merged",
         "--output_json", str(output)])  # fmt: skip
    result = json.loads(output.read_text())
    assert set(result["arms"]) == {"SCoRe [generate]", "RLOO [generate]", "SCoRe [merged]"}
    assert result["arms"]["SCoRe [merged]"]["generated_tokens_per_step"] == 4 * 2 * 4
    assert list(result["ratios"]) == ["SCoRe/RLOO [generate]"]
    with pytest.raises(ValueError, match=r"backends=\['paged'\]: \['paged'\] unknown"):
        cli(["--model", tiny_model_dir, "--backends", "paged"])
    if importlib.util.find_spec("vllm") is None:  # refused before any model loads (tests/test_vllm.py runs it)
        with pytest.raises(ValueError, match="vLLM is not installed here"):
            cli(["--model", tiny_model_dir, "--backends", "generate", "vllm"])
