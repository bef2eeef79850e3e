"""Reward functions that fail loudly: a dry run before training, value checks, and errors that name the culprit.

A reward function with a wrong signature or a missing column otherwise fails only after the first generation batch
(minutes in), and one that returns NaN or None everywhere trains nothing while the run exits 0.
"""

import inspect
import math
import numbers
import threading
from contextlib import contextmanager

from torch import nn
from transformers import TrainerState
from trl.trainer.utils import is_async_callable

from .scoring import as_completion


# Arguments TRL passes to every reward function besides the dataset's columns
TRL_REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


class RewardError(RuntimeError):
    """A reward function failed or returned a value training cannot use."""


def is_plain_reward(func) -> bool:
    """A synchronous callable (not a reward model given as a module or a hub id, not an async function)."""
    return callable(func) and not isinstance(func, nn.Module) and not is_async_callable(func)


class RewardTimeout(RewardError):
    """A reward call took longer than `reward_timeout`."""


class CheckedReward:
    """A reward function whose every returned value is checked: a number or None, finite, one per completion; with a
    `timeout`, a call that takes longer raises `RewardTimeout`."""

    def __init__(self, func, name: str, timeout: float | None = None):
        self.func, self.__name__, self.timeout = func, name, timeout

    def __call__(self, *args, **kwargs):
        values = call_with_timeout(self.func, self.timeout, self.__name__, *args, **kwargs)
        expected = len(kwargs.get("completions", args[0] if args else []))
        check_values(self.__name__, values, expected)
        return values


def call_with_timeout(func, timeout: float | None, name: str, *args, **kwargs):
    """`func(*args, **kwargs)`, or `RewardTimeout` after `timeout` seconds. The call runs in a daemon thread: Python
    cannot stop a thread, but a hung one no longer holds training, and it does not keep the process from exiting. (A
    reward that uses math-verify then verifies in a worker process, as anywhere off the main thread.)"""
    if timeout is None:
        return func(*args, **kwargs)
    outcome = {}

    def run():
        try:
            outcome["values"] = func(*args, **kwargs)
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name=f"reward {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RewardTimeout(f"reward function {name!r} did not return within reward_timeout={timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["values"]


def check_values(name: str, values, expected: int):
    if not isinstance(values, list | tuple) or len(values) != expected:
        got = f"{len(values)} values" if isinstance(values, list | tuple) else type(values).__name__
        raise RewardError(f"reward function {name!r} returned {got}; expected a list of {expected}, one per row.")
    for row, value in enumerate(values, start=1):
        if value is None:
            continue
        # numbers.Real covers NumPy scalars too, which RLOO accepts
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(
                f"reward function {name!r} returned {value!r} for row {row}: rewards must be finite numbers, or None "
                "for a row that cannot be scored (it is then left out of the baseline)."
            )


def missing_arguments(func, columns) -> list[str]:
    """Parameters `func` requires that neither TRL nor the dataset's `columns` provide."""
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return []
    required = [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return [name for name in required if name not in TRL_REWARD_ARGUMENTS and name not in columns]


def reward_call(rows: list[dict], completions: list[str], state: TrainerState | None = None) -> dict:
    """The keyword arguments RLOOTrainer passes to a reward function for these rows and completion texts."""
    columns = [key for key in rows[0] if key not in ("prompt", "completion", "completion_ids")]
    return {
        "prompts": [row["prompt"] for row in rows],
        "completions": [as_completion(text, isinstance(rows[0]["prompt"], str)) for text in completions],
        "completion_ids": [[] for _ in rows],
        **{key: [row.get(key) for row in rows] for key in columns},
        "trainer_state": state or TrainerState(),
        "log_extra": lambda *args, **kwargs: None,
        "log_metric": lambda *args, **kwargs: None,
    }


def dry_run(funcs, names, rows: list[dict], dataset_name: str = "train_dataset", note: str = "", timeout=None):
    """Call every plain reward function on `rows` with an empty placeholder completion, before any model loads.

    Raises ValueError naming the function, the columns it lacks and the fix, or the error it raised.
    """
    if not rows:
        return
    columns = [key for key in rows[0] if key != "prompt"]
    for func, name in zip(funcs, names, strict=True):
        if not is_plain_reward(func):
            continue
        missing = missing_arguments(func, columns)
        if missing:
            raise ValueError(
                f"reward function {name!r} needs {missing}, which {dataset_name} does not have as columns (columns: "
                f"{columns}). Add or rename the columns (dataset.rename_column(old, new)) or give the parameters "
                f"defaults.{note}"
            )
        try:
            CheckedReward(func, name, timeout)(**reward_call(rows, [""] * len(rows)))
        except Exception as err:
            raise ValueError(
                f"reward function {name!r} failed before training, called on {dataset_name} rows 1-{len(rows)} with "
                f"an empty placeholder completion: {type(err).__name__}: {err}.{note}"
            ) from err


def explain_failure(funcs, names, rows: list[dict], completions: list[str], attempt: int, state) -> str:
    """Which function fails on which row: each plain reward is called again row by row."""
    for func, name in zip(funcs, names, strict=True):
        if not is_plain_reward(func):
            continue
        for index, (row, text) in enumerate(zip(rows, completions, strict=True)):
            try:
                CheckedReward(func, name)(**reward_call([row], [text], state))
            except Exception as err:
                prompt = row["prompt"][-1]["content"] if isinstance(row["prompt"], list) else row["prompt"]
                return (
                    f"reward function {name!r} failed on attempt {attempt}, row {index + 1} of this batch (prompt "
                    f"{prompt[:80]!r}, completion {text[:80]!r}): {type(err).__name__}: {err}"
                )
    return f"a reward function failed on attempt {attempt} (no single row reproduces it alone)"


def checked_reward_funcs(reward_funcs, first_rows: list[dict], remove_unused_columns: bool, timeout=None) -> list:
    """The reward functions as the trainer calls them: each plain one dry-run on the dataset's first rows (as the
    trainer will see them) and wrapped in `CheckedReward`; reward models and async functions as given."""
    from .inputs import TRAINER_COLUMNS, surviving_columns

    funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    names = [getattr(f, "__name__", type(f).__name__) for f in funcs]
    # The reward sees the columns that survive `remove_unused_columns`, so a reward column it would drop fails now
    note = (
        f" remove_unused_columns=True keeps only {list(TRAINER_COLUMNS)}: set remove_unused_columns=False "
        "(RLOOConfig's default) to pass the other columns to reward functions."
        if remove_unused_columns
        else ""
    )
    dry_run(funcs, names, surviving_columns(first_rows, remove_unused_columns), note=note, timeout=timeout)
    return [CheckedReward(f, n, timeout) if is_plain_reward(f) else f for f, n in zip(funcs, names, strict=True)]


def check_scorable(trainer, rewards, streak: int) -> int:
    """Log the unscorable share per attempt; stop after `max_unscorable_steps` batches with no reward at all. Returns
    the number of such batches in a row so far."""
    import torch

    unscorable = torch.isnan(rewards)
    for t in range(rewards.size(1)):
        trainer._metrics["train"][f"turn{t + 1}/frac_unscorable"].append(unscorable[:, t].float().mean().item())
    streak = streak + 1 if unscorable.all() else 0
    if streak and streak >= (trainer.args.max_unscorable_steps or float("inf")):
        raise RewardError(
            f"Every reward function returned None for every row and attempt of {streak} generation batches in a row "
            f"(step {trainer.state.global_step}): nothing can be learned. Check that the reference column of "
            f"{trainer.reward_func_names} is filled and parses. Checkpoints already saved in "
            f"{trainer.args.output_dir} are intact."
        )
    return streak


@contextmanager
def reward_errors_named(trainer, inputs, texts: list[str], attempt: int):
    """A reward call that fails stops the run with the function, attempt, row and step named."""
    try:
        yield
    except RewardTimeout as err:  # calling it again row by row (as explain_failure does) could hang again
        raise RewardError(
            f"{err} on attempt {attempt} of the generation batch of {len(inputs)} rows at step "
            f"{trainer.state.global_step}. Training stopped; checkpoints already saved in {trainer.args.output_dir} "
            "are intact (resume with resume_from_checkpoint=last)."
        ) from err
    except Exception as err:
        where = explain_failure(trainer.reward_funcs, trainer.reward_func_names, inputs, texts, attempt, trainer.state)
        raise RewardError(
            f"{where}. Training stopped at step {trainer.state.global_step}; checkpoints already saved in "
            f"{trainer.args.output_dir} are intact (resume with resume_from_checkpoint)."
        ) from err
