"""Run by tests/test_reliability.py under `accelerate launch` (CPU): SCoRe on the tiny model, paced so that the test
can signal it mid-run; `last` as the second argument resumes. Writes each rank's pid, the steps done, and at the end
the whole log history."""

import json
import os
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer, TrainerCallback

from score_trl import SCoReTrainer
from score_trl.preemption import PREEMPTED_EXIT_CODE, end_process


sys.path.insert(0, str(Path(__file__).parent))
from conftest import letter_reward, make_args, toy_dataset  # noqa: E402


class Pace(TrainerCallback):
    """One second per step, and the step reached on disk, so the test knows when training is under way."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (Path(args.output_dir) / "progress").write_text(str(state.global_step))
        time.sleep(1.0)


def main(model_dir: str, output_dir: str, resume: str | None = None):
    args = make_args(Path(output_dir), per_device_train_batch_size=2, max_steps=8, stage_one_steps=4)
    trainer = SCoReTrainer(
        model_dir,
        reward_funcs=letter_reward,
        args=args,
        train_dataset=toy_dataset(32),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[Pace()],
    )
    (Path(output_dir) / f"pid{trainer.accelerator.process_index}").write_text(str(os.getpid()))
    trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted_at is not None:  # as score-train does
        end_process(trainer, PREEMPTED_EXIT_CODE)
    if trainer.accelerator.is_main_process:
        (Path(output_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main(*sys.argv[1:])
