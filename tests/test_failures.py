"""Failures that speak: reward errors before and during training, bad values, unscorable runs, bad paths and sizes.
Each stops with a message naming the culprit, and a stopped run leaves its checkpoints resumable."""

import re
import signal
import time
from pathlib import Path

import pytest
from datasets import IterableDataset

from score_trl import SCoReConfig, SCoReTrainer
from score_trl.reward_checks import RewardError, explain_failure

from conftest import make_args, toy_dataset, word_reward


def build(tmp_path, model, tokenizer, reward=word_reward, dataset=None, **kwargs):
    return SCoReTrainer(
        model,
        reward_funcs=reward,
        args=make_args(tmp_path, **{"max_completion_length": 6, **kwargs}),
        train_dataset=dataset if dataset is not None else toy_dataset(8),
        processing_class=tokenizer,
    )


def needs_gold(completions, gold, **kwargs):
    return [1.0] * len(completions)


def bad_signature(completions, answer, **kwargs):
    return [1.0 for _ in completions] + [1.0]  # one value too many


def test_reward_errors_fail_before_the_model_loads(tmp_path, tokenizer):
    empty = tmp_path / "empty-model"  # exists, but loading a model from it would fail with another error
    empty.mkdir()
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"reward function 'needs_gold' needs \['gold'\].*columns: \['answer'\]"):
        build(tmp_path, str(empty), tokenizer, reward=needs_gold)
    with pytest.raises(ValueError, match=r"'bad_signature' failed before training.*returned 3 values; expected .* 2"):
        build(tmp_path, str(empty), tokenizer, reward=bad_signature)
    assert time.monotonic() - start < 5


def test_failing_row_is_located():
    def odd(completions, answer, **kwargs):
        return [1.0 if int(a) % 2 == 0 else int("odd") for a in answer]

    rows = [{"prompt": [{"role": "user", "content": f"Q{i}"}], "answer": str(i)} for i in (2, 4, 5, 6)]
    message = explain_failure([word_reward, odd], ["word_reward", "odd"], rows, ["a", "b", "c", "d"], 2, None)
    assert message.startswith("reward function 'odd' failed on attempt 2, row 3 of this batch (prompt 'Q5'")
    assert "ValueError" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1.0"], ids=["nan", "inf", "string"])
def test_bad_reward_values_name_the_function(tmp_path, tiny_model_dir, tokenizer, value):
    def flaky(completions, **kwargs):
        return [value] * len(completions)

    with pytest.raises(ValueError, match=rf"'flaky' failed before training.*returned {re.escape(repr(value))}"):
        build(tmp_path, tiny_model_dir, tokenizer, reward=flaky)


def test_missing_local_model_path_says_so(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"model path '.*/no/such/model' does not exist"):
        build(tmp_path, str(tmp_path / "no" / "such" / "model"), tokenizer)


def test_dataset_smaller_than_a_generation_batch(tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match=r"has 1 rows, but one generation batch takes 2 distinct prompts.*lower"):
        build(tmp_path, tiny_model_dir, tokenizer, dataset=toy_dataset(1))


def test_iterable_dataset_gets_the_same_checks(tmp_path, tiny_model_dir, tokenizer):
    rows = [{"prompt": 42, "answer": "5"}] * 4  # neither messages nor text
    dataset = IterableDataset.from_generator(lambda: iter(rows))
    with pytest.raises(ValueError, match=r"train_dataset row 1: 'prompt' must be conversational .* or a string"):
        build(tmp_path, tiny_model_dir, tokenizer, dataset=dataset)


def raise_from_step_two(completions, answer, trainer_state, **kwargs):
    # Fine on the dry run and on the first two steps
    if trainer_state.global_step >= 2:
        raise KeyError("step 2")
    return word_reward(completions, answer)


def test_reward_error_during_training_names_function_attempt_row_and_keeps_checkpoints(
    tmp_path, tiny_model_dir, tokenizer
):
    trainer = build(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        reward=raise_from_step_two,
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
    )
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RewardError, match=r"'raise_from_step_two' failed on attempt 1, row 1 .*KeyError.*at step 2"):
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) == before  # the preemption handler does not outlive a failed run
    checkpoints = sorted(Path(trainer.args.output_dir).glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    # The run resumes from its last checkpoint once the reward is fixed, in the same step and stage
    resumed = build(tmp_path, tiny_model_dir, tokenizer, max_steps=4, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(checkpoints[-1]))
    assert resumed.state.global_step == 4
    assert [(h["step"], h["stage"]) for h in resumed.state.log_history if "loss" in h][-2:] == [(3, 2.0), (4, 2.0)]


def always_none(completions, **kwargs):
    return [None] * len(completions)


def test_unscorable_batches_are_logged_and_stop_the_run(tmp_path, tiny_model_dir, tokenizer):
    trainer = build(tmp_path, tiny_model_dir, tokenizer, reward=always_none, max_steps=10, max_unscorable_steps=3)
    with pytest.raises(RewardError, match=r"returned None for every row and attempt of 3 generation batches in a row"):
        trainer.train()
    assert trainer.state.global_step == 2  # steps 0 and 1 trained (on nothing), the third batch stopped the run
    assert trainer._metrics["train"]["turn1/frac_unscorable"][-1] == 1.0


def test_unscorable_batches_warn_as_rloo_does_and_zero_never_stops(tmp_path, tiny_model_dir, tokenizer, caplog):
    # RLOOTrainer only warns; `max_unscorable_steps=0` gives its behaviour, and its warning is there either way
    trainer = build(tmp_path, tiny_model_dir, tokenizer, reward=always_none, max_steps=4, max_unscorable_steps=0)
    with caplog.at_level("WARNING", logger="trl.trainer.rloo_trainer"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert "All reward functions returned None for the following kwargs:" in caplog.text


def test_partly_unscorable_rows_train_on(tmp_path, tiny_model_dir, tokenizer):
    def half(completions, answer, **kwargs):
        return [None if a in ("red", "green") else 0.5 for a in answer]

    trainer = build(tmp_path, tiny_model_dir, tokenizer, reward=half, max_steps=3, max_unscorable_steps=1)
    trainer.train()
    logged = [h["turn2/frac_unscorable"] for h in trainer.state.log_history if "turn2/frac_unscorable" in h]
    assert len(logged) == 3 and all(0.0 <= v < 1.0 for v in logged)


def test_cpu_config_has_no_bf16_by_default(tmp_path):
    # The README's example leaves bf16 unset; on a machine without a bf16 GPU that must not fail
    config = SCoReConfig(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 is False and config.disable_dropout is True


@pytest.mark.real_model
def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "the README has Python examples"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
        if "trainer" in namespace:
            assert namespace["trainer"].state.global_step == namespace["args"].max_steps
