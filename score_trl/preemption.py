"""Stopping cleanly when the cluster asks: SIGTERM (Kubernetes, spot instances, Slurm at the end of a job) and SIGUSR1
(what Slurm's `--signal=USR1@SECONDS` sends ahead of the end).

The signal handler only records the signal. At the end of the optimizer step in progress, every process learns
whether any process was signalled (one all-reduce of a single number), so all ranks save the same complete checkpoint
and stop together; `SCoReTrainer.train` returns with `preempted_at` set, the entry point (`score-train`) ends the
process with `PREEMPTED_EXIT_CODE` (`end_process`), and `resume_from_checkpoint="last"` continues from that step.
"""

import atexit
import logging
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "try again later", distinct from a crash (1) and from being killed (128 + signal)
PREEMPTED_EXIT_CODE = 75


class PreemptionCallback(TrainerCallback):
    """Turns the given signals into "save a checkpoint and stop" at the next optimizer-step boundary."""

    def __init__(self, signals: list[str]):
        self.signals = [getattr(signal, name) for name in signals]
        self.received: int | None = None  # the signal this process got
        self.preempted_at: int | None = None  # the step every process stopped after
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is None:
            logger.warning(f"Received {signal.Signals(signum).name}: saving a checkpoint after the current step.")
        self.received = signum

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.preempted_at = None
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals to the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}

    def on_step_end(self, args, state, control, **kwargs):
        if self.signalled(args.device):
            control.should_save = True
            control.should_training_stop = True
            self.preempted_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self):
        """Give back the handlers that were in place before training. Also called when `train()` raises (no
        `on_train_end` then): a handler left behind would swallow every later SIGTERM of the process."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def signalled(self, device) -> bool:
        """Whether any process received a signal: the flag is reduced with MAX when there are several processes."""
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([float(flag)], device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag


def end_process(trainer, status: int = 0):
    """Finish the trackers, destroy the process group and end the process with `status`.

    Alone, a process runs `sys.exit`. In a process group, interpreter teardown can deadlock: the DDP reducer's gloo
    group joins its worker thread while holding the GIL, and that thread waits for the GIL to free a finished gather
    (seen on CPU with torch 2.13 at the end of training and after a preemption). So there the exit handlers (trackers
    such as wandb finish their runs there) run first, then the process ends without teardown; every file it wrote is
    already closed."""
    distributed = dist.is_available() and dist.is_initialized()
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()
    if not distributed:
        sys.exit(status)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
