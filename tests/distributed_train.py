"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2` (CPU, gloo): DDP, DeepSpeed ZeRO-2 or
ZeRO-3, FSDP2, whichever the launch's config selects.

Trains a few SCoRe steps (Stage I then Stage II) and writes, per rank, the full parameters (gathered under ZeRO-3) and
the engine that actually ran: the wrapped model's class, the DeepSpeed stage, and whether each rank held only a shard
of the weights. Options: `--lora` (LoRA r=4 on every linear layer), `--max_steps`, `--stage_one_steps`,
`--save_steps` (0: no checkpoints), `--resume PATH|last`, `--pace` (one second per step, the step reached written to
`progress`, each rank's pid to `pid{rank}`, so that a test can signal it mid-run), `--no_gather` (ZeRO-3 generation
without gathering the weights first), `--correction_feedback` (none, verdict or a dotted path, as in SCoReConfig).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

from score_trl import SCoReTrainer
from score_trl.preemption import PREEMPTED_EXIT_CODE, end_process


sys.path.insert(0, str(Path(__file__).parent))
from conftest import letter_reward, make_args, toy_dataset  # noqa: E402


class Pace(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (Path(args.output_dir) / "progress").write_text(str(state.global_step))
        time.sleep(1.0)


def engine(trainer) -> dict:
    """What actually ran: not what was asked for (accelerate falls back to DDP silently in some cases)."""
    wrapped = trainer.model_wrapped
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = list(model.parameters())
    info = {
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped": type(wrapped).__name__,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        # ZeRO-3 leaves each rank an empty tensor and a `ds_tensor` shard; FSDP2 turns parameters into DTensors
        "zero3_partitioned": bool(params) and all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in params),
        "zero3_shard_numel": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
        "dtensor_params": sum(type(p.data).__name__ == "DTensor" or type(p).__name__ == "DTensor" for p in params),
        "total_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
    }
    return info


def full_parameters(trainer) -> dict[str, torch.Tensor]:
    """Every parameter whole, on CPU: gathered from the shards under ZeRO-3 and FSDP."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone().cpu() for n, p in model.named_parameters()}
    out = {}
    for n, p in model.named_parameters():
        tensor = p.detach()
        out[n] = (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).clone().cpu()
    return out


def skip_deepspeed_shm_op():
    """DeepSpeed on CPU JIT-compiles a shared-memory all-reduce (`deepspeed_shm_comm`, C++) when it first starts on a
    machine: about 35 s of every CI run, which starts from an empty `~/.cache/torch_extensions`. Marked incompatible,
    DeepSpeed reduces over gloo instead, as the DDP runs it is compared with do. Users keep the op (README,
    Multi-GPU); GPUs never use it."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # read by deepspeed.comm.torch.build_shm_op


def main():
    skip_deepspeed_shm_op()
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--stage_one_steps", type=int, default=1)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--pace", action="store_true")
    parser.add_argument("--no_gather", action="store_true", help="ZeRO-3: generate without gathering the weights.")
    parser.add_argument("--correction_feedback", default="none", help="none, verdict, or a dotted path.")
    a = parser.parse_args()
    output = Path(a.output_dir)
    saving = dict(save_strategy="steps", save_steps=a.save_steps) if a.save_steps else {}
    args = make_args(output, per_device_train_batch_size=2, max_steps=a.max_steps, stage_one_steps=a.stage_one_steps,
                     ds3_gather_for_generation=not a.no_gather, correction_feedback=a.correction_feedback,
                     **saving)  # fmt: skip
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SCoReTrainer(
        a.model_dir,
        reward_funcs=letter_reward,
        args=args,
        train_dataset=toy_dataset(16),
        processing_class=AutoTokenizer.from_pretrained(a.model_dir),
        peft_config=peft_config,
        callbacks=[Pace()] if a.pace else None,
    )
    rank = trainer.accelerator.process_index
    (output / f"pid{rank}").write_text(str(os.getpid()))
    trainer.train(resume_from_checkpoint=a.resume)
    if trainer.preempted_at is not None:  # as score-train does
        end_process(trainer, PREEMPTED_EXIT_CODE)
    (output / f"engine_rank{rank}.json").write_text(json.dumps(engine(trainer)))
    torch.save(full_parameters(trainer), output / f"params_rank{rank}.pt")
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        (output / "logs.json").write_text(json.dumps(logs))
        (output / "world.json").write_text(json.dumps({"num_processes": trainer.accelerator.num_processes}))


if __name__ == "__main__":
    main()
