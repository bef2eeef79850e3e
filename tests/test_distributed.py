import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM


SCRIPT = Path(__file__).parent / "distributed_train.py"


@pytest.mark.slow
def test_two_process_run_keeps_ranks_identical(tmp_path, tiny_model_dir):
    # `--multi_gpu` selects the multi-process launcher; with use_cpu=True the processes join a gloo group on CPU.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        str(SCRIPT), tiny_model_dir, str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    assert json.loads((tmp_path / "world.json").read_text())["num_processes"] == 2
    rank0 = torch.load(tmp_path / "params_rank0.pt")
    rank1 = torch.load(tmp_path / "params_rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert any(not torch.equal(initial[n], rank0[n]) for n in rank0)  # it trained, so equality means synchronized
    logs = json.loads((tmp_path / "logs.json").read_text())
    assert [h["stage"] for h in logs] == [1.0, 2.0, 2.0]
    assert all("turn2/reward" in h and "self_correction/reward_delta" in h for h in logs)
