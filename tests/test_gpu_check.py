"""scripts/gpu_check.py in its CPU mode (tiny Gemma 2, no bitsandbytes), so the GPU check never rots between the
rare GPU sessions: every stage runs as on a GPU, writes its figures as it ends, and CUDA-only stages say why they
were skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_stage(tmp_path, tiny_model_dir):
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many?", "answer": f"#### {a + b}"}
            for a, b in [(2, 3), (4, 4), (7, 1), (3, 9), (5, 5), (6, 2), (8, 3), (1, 1)]]  # fmt: skip
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--tokenizer", tiny_model_dir,
               "--data", str(data), "--output", str(out), "--work", str(tmp_path / "work")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((out / "gpu_check.json").read_text())
    stages = result["stages"]
    ran = [
        "setup",
        "model",
        "recipe",
        "benchmark",
        "backend_generate",
        "backend_static",
        "backend_continuous_batching",
        "backend_merged",
    ]
    assert {name: stages[name]["status"] for name in ran} == dict.fromkeys(ran, "ok"), (
        out / "gpu_check.log"
    ).read_text()[-3000:]
    skipped = ["backend_static_compiled", "backend_continuous_batching_cuda_graphs", "zero2"]
    assert all(stages[name]["status"] == "skipped" and stages[name]["why"] for name in skipped)
    # The recipe's two steps: Stage I then Stage II, each timed
    assert [(s["step"], s["stage"]) for s in stages["recipe"]["steps"]] == [(1, 1.0), (2, 2.0)]
    assert all(s["step_time"] > 0 for s in stages["recipe"]["steps"]) and stages["recipe"]["recipe_step_s"] > 0
    benchmark = stages["benchmark"]
    assert benchmark["ratio"] == pytest.approx(
        benchmark["arms"]["SCoRe"]["step_median_s"] / benchmark["arms"]["RLOO"]["step_median_s"]
    )
    assert benchmark["decode_ms"] > 0 and stages["backend_static"]["decode_ms_per_step"] > 0
    assert result["stages"]["setup"]["versions"]["trl"] == "1.16.0"
    table = (out / "gpu_check.md").read_text()
    assert (
        "| recipe | ok |" in table and "| peak GPU memory with nf4 (recipe, max_memory_allocated) | missing |" in table
    )
    assert "===== recipe: ok" in (out / "gpu_check.log").read_text()


def test_gpu_check_without_a_bundle_says_how_to_make_one(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--bundle", str(tmp_path / "none"),
               "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work")]  # fmt: skip
    subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    setup = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]["setup"]
    assert "make gpu-bundle" in setup["status"]
