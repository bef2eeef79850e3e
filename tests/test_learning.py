"""Learning signal: Stage I raises the second attempt's reward while beta2 holds the first attempt to the reference."""

import statistics

import pytest
from datasets import Dataset

from score_trl import SCoReConfig, SCoReTrainer

from conftest import toy_question


STEPS = 150


def letter_overlap_reward(completions, answer, **kwargs):
    """Share of the completion's characters that occur in the answer word: a dense verifier for a toy task."""
    texts = [c[0]["content"] for c in completions]
    return [sum(ch in a for ch in t) / max(len(t), 1) for t, a in zip(texts, answer, strict=True)]


def stage_one_run(tmp_path, tiny_model_dir, tokenizer, beta2):
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": toy_question("red")}]] * 32, "answer": ["red"] * 32}
    )
    args = SCoReConfig(
        output_dir=str(tmp_path / f"beta2-{beta2}"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=8,
        max_steps=STEPS,
        stage_one_steps=STEPS,  # Stage I only
        logging_steps=1,
        learning_rate=1e-2,
        beta=0.01,
        beta2=beta2,
        seed=0,
    )
    trainer = SCoReTrainer(
        tiny_model_dir, letter_overlap_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def mean(logs, key, part):
    return statistics.mean(h[key] for h in part(logs))


@pytest.mark.slow
def test_stage_one_improves_turn_two_and_holds_turn_one(tmp_path, tiny_model_dir, tokenizer):
    first, last = (lambda logs: logs[:10]), (lambda logs: logs[-10:])
    held = stage_one_run(tmp_path, tiny_model_dir, tokenizer, beta2=0.5)
    assert all(h["stage"] == 1.0 for h in held)
    # Turn 2 learns the task...
    assert mean(held, "turn2/reward", last) - mean(held, "turn2/reward", first) > 0.4
    # ...while turn 1 stays at the reference: bounded KL, first-attempt reward unchanged within noise
    assert max(h["turn1/kl"] for h in held) < 0.1
    assert abs(mean(held, "turn1/reward", last) - mean(held, "turn1/reward", first)) < 0.15

    # Control: without beta2 the shared weights drag turn 1 along with turn 2
    free = stage_one_run(tmp_path, tiny_model_dir, tokenizer, beta2=0.0)
    assert mean(free, "turn1/kl", last) > 10 * max(h["turn1/kl"] for h in held)
