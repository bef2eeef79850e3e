"""Two CPU processes over gloo through `accelerate launch`: DDP, DeepSpeed ZeRO-2 and ZeRO-3 with the project's CPU
configs (`recipes/accelerate_configs/cpu/`), and an FSDP config, which accelerate cannot apply on CPU and which is
therefore refused. Each test asserts the engine that actually ran (tests/distributed_train.py records it per rank), not
only that training finished: accelerate falls back to DDP silently where it cannot apply an engine."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from score_trl.checkpoints import last_complete_checkpoint, missing_parts


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "distributed_train.py"
CONFIGS = ROOT / "recipes" / "accelerate_configs"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed: pip install -e '.[deepspeed]' (`make install` does)",
)


def launch(config: list[str], output: Path, *args, port: int) -> subprocess.Popen:
    """`accelerate launch` of tests/distributed_train.py on two CPU processes, in its own session."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes", "2",
               "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", str(port),
               str(SCRIPT), *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    output.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def finish(process: subprocess.Popen, timeout: int = 600) -> tuple[int, str, str]:
    """(exit status, stdout, stderr); on a time-out the whole process group is killed (no hung ranks left)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"still running after {timeout} s:\n{stderr[-3000:]}")
    return process.returncode, stdout, stderr


def run(config: list[str], output: Path, *args, port: int) -> dict:
    """Launch, wait, and read what each rank wrote: {"engines": [...], "params": [...], "logs": [...]}."""
    status, _, stderr = finish(launch(config, output, *args, port=port))
    assert status == 0, stderr[-4000:]
    return {
        "engines": [json.loads((output / f"engine_rank{r}.json").read_text()) for r in (0, 1)],
        "params": [torch.load(output / f"params_rank{r}.pt") for r in (0, 1)],
        "logs": json.loads((output / "logs.json").read_text()),
    }


def assert_ranks_equal(params: list[dict]):
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][n], params[1][n]) for n in params[0])


DDP = ["--multi_gpu", "--mixed_precision", "no"]  # with use_cpu the processes join a gloo group on CPU
ZERO2 = ["--config_file", str(CONFIGS / "cpu" / "zero2.yaml")]
ZERO3 = ["--config_file", str(CONFIGS / "cpu" / "zero3.yaml")]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_model_dir):
    output = tmp_path_factory.mktemp("ddp")
    return run(DDP, output, tiny_model_dir, output, port=29517)


@pytest.mark.slow
def test_ddp_keeps_ranks_identical(ddp, tiny_model_dir):
    assert {e["wrapped"] for e in ddp["engines"]} == {"DistributedDataParallel"}
    assert ddp["engines"][0]["num_processes"] == 2
    assert_ranks_equal(ddp["params"])
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert any(not torch.equal(initial[n], ddp["params"][0][n]) for n in initial)  # it trained: equality is sync
    assert [h["stage"] for h in ddp["logs"]] == [1.0, 2.0, 2.0]
    assert all("turn2/reward" in h and "self_correction/reward_delta" in h for h in ddp["logs"])


@pytest.mark.slow
@needs_deepspeed
def test_zero2_matches_ddp(ddp, tmp_path, tiny_model_dir):
    zero2 = run(ZERO2, tmp_path, tiny_model_dir, tmp_path, port=29518)
    assert [(e["wrapped"], e["zero_stage"]) for e in zero2["engines"]] == [("DeepSpeedEngine", 2)] * 2
    assert_ranks_equal(zero2["params"])
    # The same three steps as DDP: same rollouts, same losses, weights equal within float32 rounding
    assert [h["loss"] for h in zero2["logs"]] == pytest.approx([h["loss"] for h in ddp["logs"]], abs=1e-6)
    for name, weight in ddp["params"][0].items():
        torch.testing.assert_close(zero2["params"][0][name], weight, rtol=0, atol=1e-6)


# One uninterrupted ZeRO-3 run with LoRA, 6 steps (3 in Stage I): checked on its own, and the preempted-and-resumed
# run must end bitwise equal to it
ZERO3_RUN = ["--lora", "--max_steps", "6", "--stage_one_steps", "3"]


@pytest.fixture(scope="module")
def zero3_whole(tmp_path_factory, tiny_model_dir):
    output = tmp_path_factory.mktemp("zero3")
    return run(ZERO3, output, tiny_model_dir, output, *ZERO3_RUN, port=29519)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_shards_lora_generates_and_trains_both_stages(zero3_whole):
    zero3 = zero3_whole
    for engine in zero3["engines"]:
        assert (engine["wrapped"], engine["zero_stage"]) == ("DeepSpeedEngine", 3)
        # Really sharded: every parameter is an empty placeholder, each rank holds half of the elements
        assert engine["zero3_partitioned"] and engine["zero3_shard_numel"] == engine["total_numel"] / 2
    assert_ranks_equal(zero3["params"])
    adapter = [n for n in zero3["params"][0] if "lora_B" in n]
    assert adapter and any(zero3["params"][0][n].abs().sum() > 0 for n in adapter)  # lora_B starts at 0: it trained
    logs = zero3["logs"]
    assert [h["stage"] for h in logs] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    # Two attempts were generated (with the weights TRL gathers for generation) and scored under ZeRO-3
    assert all(h["turn1/completions/mean_length"] > 0 and h["turn2/completions/mean_length"] > 0 for h in logs)
    assert all(h["turn2/kl"] >= 0 for h in logs) and logs[-1]["turn1/kl"] > 0  # Stage II: KL on turn 1 too


@pytest.mark.slow
@needs_deepspeed
def test_zero3_preemption_saves_every_shard_and_resumes_bitwise(zero3_whole, tmp_path, tiny_model_dir):
    common, whole = ZERO3_RUN, zero3_whole

    # SIGUSR1 to rank 1 only: every rank saves its shards of the same step, and the launch exits with 75
    stopped = tmp_path / "stopped"
    process = launch(ZERO3, stopped, tiny_model_dir, stopped, *common, "--pace", port=29521)
    deadline = time.monotonic() + 300
    while not ((stopped / "progress").is_file() and int((stopped / "progress").read_text() or 0) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    os.kill(int((stopped / "pid1").read_text()), signal.SIGUSR1)
    status, stdout, stderr = finish(process)
    assert status != 0 and re.search(r"exitcode: 75\)", stderr), stderr[-3000:]
    assert "Preempted: checkpoint-" in stdout and not (stopped / "logs.json").exists()
    (checkpoint,) = stopped.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 6 and missing_parts(checkpoint) == []
    assert (checkpoint / "latest").read_text() == f"global_step{step}"
    shards = sorted(p.name for p in (checkpoint / f"global_step{step}").iterdir())
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")]

    # A later checkpoint whose global_step folder was cut short (rank 1's optimizer shard never written) is skipped
    broken = stopped / f"checkpoint-{step + 1}"
    shutil.copytree(checkpoint, broken)
    (broken / f"global_step{step}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert missing_parts(broken) == [f"global_step{step}/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert last_complete_checkpoint(stopped) == str(checkpoint)

    resumed = run(ZERO3, stopped, tiny_model_dir, stopped, *common, "--resume", "last", port=29522)
    steps = [(h["step"], h["stage"]) for h in resumed["logs"]]
    assert steps == [(s, 1.0 if s <= 3 else 2.0) for s in range(1, 7)]  # same stage, next step, no gap or repeat
    for rank in (0, 1):
        assert resumed["params"][rank].keys() == whole["params"][rank].keys()
        assert all(torch.equal(resumed["params"][rank][n], whole["params"][rank][n]) for n in whole["params"][rank])


FSDP2_ON_CPU = {
    "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1, "num_processes": 2,
    "mixed_precision": "no", "use_cpu": True,
    "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_reshard_after_forward": True},
}  # fmt: skip


@pytest.mark.slow
def test_a_feedback_failure_on_one_rank_ends_the_run_on_every_rank(tmp_path, tiny_model_dir):
    # The judge fails in the second process only, on the first real attempts: that rank raises naming the function,
    # and the launcher ends the other rank instead of leaving it waiting in a collective
    output = tmp_path / "run"
    status, _, stderr = finish(launch(DDP, output, tiny_model_dir, output, "--correction_feedback",
                                      "feedback_funcs.fail_on_rank_one", port=29532), timeout=300)  # fmt: skip
    assert status != 0
    assert "feedback function 'feedback_funcs.fail_on_rank_one' failed on attempt 1 at step 0" in stderr
    assert "judge unreachable" in stderr
    assert not (output / "engine_rank0.json").exists() and not (output / "engine_rank1.json").exists()


@pytest.mark.slow
def test_fsdp_launch_on_cpu_is_refused_not_run_as_ddp(tmp_path, tiny_model_dir):
    config = tmp_path / "fsdp2.yaml"
    config.write_text(yaml.safe_dump(FSDP2_ON_CPU))
    status, _, stderr = finish(launch(["--config_file", str(config)], tmp_path, tiny_model_dir, tmp_path, port=29523))
    assert status != 0 and "An FSDP accelerate config was launched on CPU" in stderr, stderr[-3000:]
    assert not list(tmp_path.glob("engine_rank*.json"))  # refused before training


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_cpu_configs_differ_from_the_shipped_ones_only_where_cpu_needs_it(name):
    shipped = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cpu = yaml.safe_load((CONFIGS / "cpu" / f"{name}.yaml").read_text())
    assert shipped["use_cpu"] is False and shipped["mixed_precision"] == "bf16"
    assert cpu["use_cpu"] is True and cpu["num_processes"] == 2
    same = {k for k in shipped if k not in ("use_cpu", "mixed_precision", "num_processes", "deepspeed_config")}
    assert {k: cpu[k] for k in same} == {k: shipped[k] for k in same}
    ds, ds_cpu = shipped["deepspeed_config"], cpu["deepspeed_config"]
    if name == "zero2":
        assert cpu["mixed_precision"] == "no" and ds_cpu == ds
        return
    # ZeRO-3's CPU settings live in a DeepSpeed file: the same stage, offloading and saving, bf16 off, every
    # parameter sharded (accelerate refuses mixed_precision beside a DeepSpeed file)
    assert "mixed_precision" not in cpu and ds_cpu["zero3_init_flag"] == ds["zero3_init_flag"]
    file = json.loads((ROOT / ds_cpu["deepspeed_config_file"]).read_text())
    zero = file["zero_optimization"]
    assert zero["stage"] == ds["zero_stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["offload_optimizer"]["device"] == ds["offload_optimizer_device"] == "none"
    assert zero["offload_param"]["device"] == ds["offload_param_device"] == "none"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is ds["zero3_save_16bit_model"] is True
    assert file["bf16"] == {"enabled": False}
