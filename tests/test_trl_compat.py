"""What RLOOTrainer users rely on: its metric keys (checked against a real RLOOTrainer run), what reward functions log
under their own names, `_logs`, and the columns `remove_unused_columns` keeps."""

import inspect
import re

import pytest
import trl.trainer.utils as trl_utils
from datasets import Dataset
from trl import RLOOConfig, RLOOTrainer

import score_trl.trainer as score_trainer_module
from score_trl import SCoReTrainer

from conftest import letter_reward, make_args, make_trainer, toy_dataset, toy_question


# Keys of the Trainer itself, not of RLOO's rollout
TRAINER_KEYS = {"loss", "grad_norm", "learning_rate", "epoch", "step", "step_time"}


def rloo_trainer(tmp_path, tiny_model_dir, tokenizer):
    """TRL's own RLOOTrainer on the tiny model: the reference SCoRe is checked against."""
    return RLOOTrainer(
        tiny_model_dir,
        reward_funcs=letter_reward,
        args=RLOOConfig(
            output_dir=str(tmp_path / "rloo"),
            use_cpu=True,
            bf16=False,
            report_to="none",
            max_steps=1,
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=8,
            logging_steps=1,
            save_strategy="no",
            beta=0.01,
        ),  # fmt: skip
        train_dataset=toy_dataset(8),
        processing_class=tokenizer,
    )


def logged_keys(trainer) -> dict:
    trainer.train()
    return next(h for h in trainer.state.log_history if "loss" in h)


def test_every_rloo_metric_key_is_logged_with_its_two_attempt_meaning(tmp_path, tiny_model_dir, tokenizer):
    rloo = rloo_trainer(tmp_path, tiny_model_dir, tokenizer)
    rloo_keys = set(logged_keys(rloo)) - TRAINER_KEYS
    assert {"reward", "kl", "clip_ratio/low_min", "completions/max_terminated_length"} <= rloo_keys

    log = logged_keys(make_trainer(tmp_path / "score", tiny_model_dir, tokenizer, max_steps=1))
    assert rloo_keys - set(log) == set()
    # Single numbers mean the final attempt; kl, entropy and clip ratios span every trained token of every attempt
    per_function = ("rewards/letter_reward/mean", "rewards/letter_reward/std")
    for key in ("reward", "reward_std", "frac_reward_zero_std", *per_function):
        assert log[key] == pytest.approx(log[f"turn2/{key}"]), key
    for key in ("mean_length", "clipped_ratio", "min_terminated_length", "max_terminated_length"):
        assert log[f"completions/{key}"] == pytest.approx(log[f"turn2/completions/{key}"]), key
    low, high = sorted((log["turn1/kl"], log["turn2/kl"]))
    assert low - 1e-9 <= log["kl"] <= high + 1e-9
    assert 0.0 <= log["clip_ratio/low_min"] <= log["clip_ratio/low_mean"] <= 1.0


def test_reward_logs_keep_their_names_and_fill_rloo_logs(tmp_path, tiny_model_dir, tokenizer):
    def logging_reward(completions, answer, log_extra, log_metric, **kwargs):
        rewards = letter_reward(completions)
        log_extra("length", [len(c[0]["content"]) for c in completions])
        log_metric("mean_letters", sum(rewards) / len(rewards))
        return rewards

    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, reward=logging_reward, max_steps=1)
    trainer.train()
    table, n = trainer._attempt_logs, trainer.args.generation_batch_size
    for t in (1, 2):
        assert list(table[f"length/turn{t}"]) == [len(text) for text in table[f"attempt_{t}"]]
        assert len(table[f"attempt_{t}"]) == n
    assert list(table["length"]) == list(table["length/turn2"])  # the name as written: the final attempt
    log = trainer.state.log_history[0]
    for t in (1, 2):
        assert log[f"mean_letters/turn{t}"] == pytest.approx(log[f"turn{t}/reward"], abs=1e-6)
    assert log["mean_letters"] == pytest.approx(log["mean_letters/turn2"])

    # RLOO's record of the latest generation batch, as its table and callbacks read it
    logs = trainer._logs
    assert len(logs["prompt"]) == len(logs["completion"]) == len(logs["advantages"]) == n
    assert all(p[-1]["role"] == "user" for p in logs["prompt"])
    first = logs["completion"][0]
    assert [m["role"] for m in first] == ["assistant", "user", "assistant"]
    assert [first[0]["content"], first[2]["content"]] == [table["attempt_1"][0], table["attempt_2"][0]]
    assert list(logs["rewards"]["logging_reward"]) == pytest.approx(list(table["reward_2"]))
    assert list(logs["rewards"]["logging_reward/turn1"]) == pytest.approx(list(table["reward_1"]))
    assert list(logs["advantages"]) == pytest.approx(list(table["advantage_2"]))
    assert list(logs["extra"]["length"]) == list(table["length/turn2"])


def rows_with_own_columns(n=8):
    words = ["red", "blue", "cat", "dog"] * (n // 4)
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": toy_question(w)}] for w in words],
            "answer": words,
            "correction_instruction": ["Check the word and answer again."] * n,
            "first_attempt": [f"The word is {w}." if i % 2 else None for i, w in enumerate(words)],
        }
    )


def test_remove_unused_columns_keeps_the_trainer_columns(tmp_path, tiny_model_dir, tokenizer):
    def needs_nothing(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = SCoReTrainer(
        tiny_model_dir,
        reward_funcs=needs_nothing,
        args=make_args(tmp_path, remove_unused_columns=True),
        train_dataset=rows_with_own_columns(),
        processing_class=tokenizer,
    )
    kept = trainer._remove_unused_columns(trainer.train_dataset)
    assert set(kept.column_names) == {"prompt", "correction_instruction", "first_attempt"}
    batch = next(iter(trainer.get_train_dataloader()))
    assert all(row["correction_instruction"] == "Check the word and answer again." for row in batch)
    assert all("first_attempt" in row and "answer" not in row for row in batch)


def test_remove_unused_columns_that_would_starve_a_reward_is_refused(tmp_path, tiny_model_dir, tokenizer):
    def needs_answer(completions, answer, **kwargs):
        return [float(a in c[0]["content"]) for c, a in zip(completions, answer, strict=True)]

    with pytest.raises(ValueError, match=r"needs \['answer'\].*remove_unused_columns=False"):
        SCoReTrainer(
            tiny_model_dir,
            reward_funcs=needs_answer,
            args=make_args(tmp_path, remove_unused_columns=True),
            train_dataset=rows_with_own_columns(),
            processing_class=tokenizer,
        )


def documented_internals() -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(methods with their parameters, attributes) from the trainer docstring's "TRL internals we rely on" list."""
    block = SCoReTrainer.__doc__.split("TRL internals we rely on")[1]
    methods_part, rest = block.split("- attributes:")
    attributes_part = rest.split("- `trl.trainer.utils")[0]
    methods = [
        (name, [p.strip() for p in params.split(",")])
        for name, params in re.findall(r"`(\w+)\(([^)]*)\)`", methods_part)
    ]
    return methods, re.findall(r"`(\w+)`", attributes_part)


def test_every_trl_internal_we_rely_on_exists_as_documented(tmp_path, tiny_model_dir, tokenizer):
    methods, attributes = documented_internals()
    assert len(methods) == 3 and len(attributes) == 18
    for name, params in methods:
        signature = inspect.signature(getattr(RLOOTrainer, name))
        assert [p for p in signature.parameters if p != "self"] == params, name
    rloo = rloo_trainer(tmp_path, tiny_model_dir, tokenizer)
    missing = [name for name in attributes if not hasattr(rloo, name)]
    assert missing == []
    assert list(inspect.signature(trl_utils._use_triton).parameters) == ["device"]

    # And the list is complete: every private RLOO member the trainer touches is on it
    source = inspect.getsource(score_trainer_module)
    used = set(re.findall(r"self\.(_[a-z]\w*)", source))
    own = {name for name in used if name in vars(SCoReTrainer) or name in ("_turns", "_unscorable_streak",
           "_attempt_logs", "_preemption")}  # fmt: skip
    inherited = {name for name in used - own if hasattr(rloo, name)}
    assert inherited - {name for name, _ in methods} - set(attributes) == set()
