"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2` (CPU, gloo).

Trains a few SCoRe steps (Stage I then Stage II) and saves each rank's parameters and logs for comparison.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from score_trl import SCoReTrainer


sys.path.insert(0, str(Path(__file__).parent))
from conftest import letter_reward, make_args, toy_dataset  # noqa: E402


def main(model_dir: str, output_dir: str):
    args = make_args(Path(output_dir), per_device_train_batch_size=2, max_steps=3)
    trainer = SCoReTrainer(
        model_dir,
        reward_funcs=letter_reward,
        args=args,
        train_dataset=toy_dataset(16),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    params = {n: p.detach().cpu() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
    torch.save(params, Path(output_dir) / f"params_rank{rank}.pt")
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        (Path(output_dir) / "logs.json").write_text(json.dumps(logs))
        (Path(output_dir) / "world.json").write_text(json.dumps({"num_processes": trainer.accelerator.num_processes}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
