"""scripts/gpu_check.py: its limits fit the budget, a stage at its limit leaves nothing running, and its CPU mode (tiny
Gemma 2, no bitsandbytes) runs every stage in the GPU order, so the check never rots between the rare GPU sessions."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def running_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_required_limits_fit_the_budget_and_follow_the_measured_figures():
    limits = gpu_check.limits()
    required = [name for name, _, req in gpu_check.timeline() if req]
    assert sum(limits[name] for name in required) <= 480
    # Every figure the issue asks of a first GPU call comes from a required stage
    assert {"setup", "recipe_step", "ratio_128"} <= set(required)
    assert sum(name.startswith("backend_") for name in required) + 1 >= 3  # ratio_128 measures padded generate
    # The limits come from the hand-measured H200 figures: one recipe step needs 30 s of loading and 94.8 s
    assert limits["recipe_step"] >= 30 + 94.8
    assert limits["backend_continuous_batching"] >= 30 + 2 * 128 * 0.070
    # Required stages come first; optional ones only use what they leave
    order = [req for _, _, req in gpu_check.timeline()]
    assert order == sorted(order, reverse=True)


def check_for(tmp_path, **overrides):
    args = dict(output=str(tmp_path / "out"), work=str(tmp_path / "work"), bundle=str(tmp_path / "none"), cpu=True,
                tokenizer=None, data=None, budget=None, scale=None, limit=None, grace=1.0)  # fmt: skip
    return gpu_check.Check(argparse.Namespace(**(args | overrides)))


IGNORES_SIGTERM = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pids = sys.argv[1]
child = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "os.setsid() if os.environ.get('LEAVE') else None; "
         f"open({pids!r}, 'a').write(f'{{os.getpid()}}\\\\n'); time.sleep(600)")
subprocess.Popen([sys.executable, "-c", child])
subprocess.Popen([sys.executable, "-c", child], env={**os.environ, "LEAVE": "1"})  # leaves the process group
open(pids, "a").write(f"{os.getpid()}\\n")
time.sleep(600)
"""


def test_a_stage_at_its_limit_leaves_no_process_behind_and_the_next_stage_runs(tmp_path):
    check = check_for(tmp_path, limit=[("recipe_step", 4.0)], grace=1.0)
    pids = tmp_path / "pids"
    entry = check.record("recipe_step", check.run("recipe_step", [sys.executable, "-c", IGNORES_SIGTERM, str(pids)]))
    assert entry["status"] == "timed out after 4 s"
    started = [int(p) for p in pids.read_text().split()]
    assert len(set(started)) == 3  # the stage's process, a child in its group, and one that left the group
    assert not [pid for pid in started if is_running(pid)] and not running_in_group(entry["pgid"])
    assert "left_running" not in entry and entry["seconds"] < 4 + 1 + 10 + 5
    after = check.record("model", check.run("model", [sys.executable, "-c", "print('next stage')"]))
    assert after["status"] == "ok"
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]
    assert list(saved) == ["recipe_step", "model"] and saved["recipe_step"]["status"].startswith("timed out")


def test_optional_stages_run_only_on_what_the_required_ones_leave(tmp_path):
    check = check_for(tmp_path, budget=100.0, scale=1.0)
    assert check.allowance("setup") == (check.limits["setup"], None)
    seconds, why = check.allowance("ratio_512")
    assert seconds == 0 and why.startswith("budget left")
    check.deadline -= 99
    assert check.allowance("recipe_step") == (0, "time budget spent")


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_the_gpu_order_and_survives_an_overrun(tmp_path, tiny_model_dir):
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many?", "answer": f"#### {a + b}"}
            for a, b in [(2, 3), (4, 4), (7, 1), (3, 9), (5, 5), (6, 2), (8, 3), (1, 1)]]  # fmt: skip
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    # The rehearsal: the recipe's second step gets 1 s, so it is stopped while it loads, and everything after it runs.
    # Not more: the whole stage (accelerate's launcher, the trainer's imports, the model, one step) ends in 8 s here
    # and faster on CI's machine, which once made an 8 s limit pass the stage. At 1 s `accelerate launch` alone is
    # still importing (1.3-1.6 s measured); the group kill of a stage's descendants has its own exact test above.
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--tokenizer", tiny_model_dir,
               "--data", str(data), "--output", str(out), "--work", str(tmp_path / "work"),
               "--limit", "recipe_step2=1", "--grace", "2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((out / "gpu_check.json").read_text())
    stages, log = result["stages"], (out / "gpu_check.log").read_text()
    assert list(stages) == [name for name, _, _ in gpu_check.timeline()]
    skipped = {"backend_continuous_batching_cuda_graphs", "backend_static_compiled", "zero2"}
    assert all(stages[name]["status"] == "skipped" and stages[name]["why"] for name in skipped)
    ok = set(stages) - skipped - {"recipe_step2"}
    assert {name: stages[name]["status"] for name in ok} == dict.fromkeys(ok, "ok"), log[-4000:]
    # The overrun: stopped at its limit, nothing of it left, and the stage after it still ran
    overrun = stages["recipe_step2"]
    assert overrun["status"] == "timed out after 1 s" and "left_running" not in overrun
    assert not running_in_group(overrun["pgid"]) and stages["ratio_512"]["status"] == "ok"
    # The recipe's step, in Stage II, read from the step report the trainer wrote as it logged
    recipe = stages["recipe_step"]
    assert [(s["step"], s["stage"]) for s in recipe["steps"]] == [(1, 2.0)]
    assert recipe["step_s"] == recipe["steps"][0]["step_time"] > 0 and recipe["peak_gib"] is None  # no CUDA here
    versions = stages["setup"]["versions"]
    assert versions["trl"]["version"] == "1.16.0" and versions["score_trl"]["from"].startswith(str(ROOT))
    for name in ("ratio_128", "ratio_512"):
        arms = stages[name]["arms"]
        assert stages[name]["ratio"] == pytest.approx(arms["SCoRe"]["step_median_s"] / arms["RLOO"]["step_median_s"])
    assert stages["ratio_128"]["tokens_per_attempt"] == 4 and stages["ratio_512"]["tokens_per_attempt"] == 8
    decode = gpu_check.measured(stages)["decode_ms_by_backend"]
    assert set(decode) == {"continuous_batching", "generate", "merged"} and min(decode.values()) > 0
    table = (out / "gpu_check.md").read_text()
    assert "| recipe_step | ok |" in table and "| recipe_step2 | timed out after 1 s |" in table
    assert "| peak GPU memory with nf4 (recipe step, max_memory_allocated) | missing |" in table
    assert "===== recipe_step2: timed out" in log and "Fastest generation backend here" in table


def test_gpu_check_without_a_bundle_says_how_to_make_one(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--bundle", str(tmp_path / "none"),
               "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work")]  # fmt: skip
    subprocess.run(command, capture_output=True, text=True, timeout=120, check=True, env={**os.environ})
    setup = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]["setup"]
    assert "make gpu-bundle" in setup["status"]
