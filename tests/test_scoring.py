"""One scoring path for training and evaluation (`score_trl.scoring`): reward combination, the conversation an attempt
answered, the answer a reward grades, and per-row task rewards; and the end-to-end check that evaluation reports what
the trainer computes for the same completions."""

import json
import math

import pytest
import torch
from datasets import Dataset

from score_trl.data import default_reward_names
from score_trl.evaluation import evaluate
from score_trl.generation import TransformersGenerator
from score_trl.rewards import final_answer, math_answer_reward, numeric_reward, task_reward
from score_trl.scoring import answered_conversations, combine_rewards, graded_answer, score_texts
from score_trl.stats import change_flags
from score_trl.turns import instruction_for

from conftest import letter_reward, make_trainer, toy_dataset, word_reward


def test_combine_rewards_weights_skips_none_and_clips():
    nan = math.nan
    per_func = torch.tensor([[1.0, nan], [nan, nan], [0.25, 1.0], [-1.0, 0.0]])
    combined = combine_rewards(per_func, torch.tensor([2.0, 0.5]), (-1.0, 1.2))
    # row 0: 2 x 1 = 2 clipped to 1.2; row 1: no function scored it; row 2: 0.5 + 0.5; row 3: -2 clipped to -1
    assert combined[[0, 2, 3]].tolist() == pytest.approx([1.2, 1.0, -1.0]) and math.isnan(combined[1])
    assert combine_rewards(per_func, torch.tensor([1.0, 1.0]))[[0, 2, 3]].tolist() == [1.0, 1.25, -1.0]


def test_score_texts_combines_as_training_and_keeps_none():
    rows = [{"prompt": "p", "answer": "5"}, {"prompt": "p", "answer": None}]
    texts = ["The answer is 5.", "The answer is 6."]
    assert score_texts([numeric_reward], ["p", "p"], texts, rows) == [1.0, None]
    assert score_texts([numeric_reward, numeric_reward], ["p", "p"], texts, rows, [0.5, 2.0]) == [2.5, None]
    assert score_texts([numeric_reward], ["p", "p"], texts, rows, [3.0], (0.0, 2.0)) == [2.0, None]


def test_answered_conversations_holds_every_earlier_turn():
    prompts = [[{"role": "user", "content": "x"}]]
    texts = [["y1"], ["y2"], ["y3"]]
    corrections = [["fix"], ["Wrong.\n\nfix"]]  # each attempt's own correction turn (its feedback differs)
    assert answered_conversations(prompts, texts, corrections, 0) == prompts
    assert answered_conversations(prompts, texts, corrections, 2) == [
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y1"}, {"role": "user", "content": "fix"},
         {"role": "assistant", "content": "y2"}, {"role": "user", "content": "Wrong.\n\nfix"}]
    ]  # fmt: skip


def test_answer_changed_reads_what_the_reward_grades():
    # The case: the graded number did not move, only the working in front of it
    before, after = ["The answer is 6 × 18 = 108."], ["The answer is 108."]
    assert change_flags(before, after, graded_answer([numeric_reward])) == ([True], [False])
    assert change_flags(before, after, final_answer) == ([True], [True])  # what the anchored reading used to say
    assert graded_answer([math_answer_reward])("Working.\n**Answer:** 12") == "12"
    assert graded_answer([letter_reward]) is final_answer  # a user's reward: the general reading


def test_task_reward_scores_each_row_with_its_own_task():
    completions = [[{"role": "assistant", "content": t}] for t in ("The answer is 5.", "I get 3 then 7", "7", "x")]
    rewards = task_reward(completions, task=["math", "arithmetic", "math", None], answer=["5", "7", "7", "1"])
    # math needs an anchored answer; arithmetic grades the last number; no task, no reward
    assert rewards == [1.0, 1.0, 0.0, None]
    mixed = Dataset.from_dict({"task": ["math", "arithmetic"]})
    assert default_reward_names(mixed) == ["task"]
    assert default_reward_names(Dataset.from_dict({"task": ["arithmetic"] * 2})) == ["numeric"]


@pytest.mark.slow
def test_evaluation_reports_the_trainers_combined_reward(tmp_path, tiny_model_dir, tokenizer):
    # Train a few steps with two weighted, clipped rewards, then evaluate greedily on the training rows: every
    # attempt's reward in the records is what the trainer's own reward path gives for that completion
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, reward=[letter_reward, word_reward], max_steps=2,
                           reward_weights=[0.5, 2.0], reward_clip_range=(0.0, 1.5))  # fmt: skip
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    rows = toy_dataset(8)
    generator = TransformersGenerator(model, tokenizer, max_new_tokens=8)
    summary = evaluate(generator, tokenizer, rows, trainer.reward_funcs, output_jsonl=tmp_path / "eval.jsonl",
                       progress=False, reward_weights=trainer.reward_weights.tolist(),
                       reward_clip_range=trainer.reward_clip_range)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert summary["n"] == len(records) == 8
    inputs = list(rows)
    prompts = [row["prompt"] for row in inputs]
    instructions = [instruction_for(row, trainer.args.correction_instruction) for row in inputs]
    texts = [[r["attempt_1"] for r in records], [r["attempt_2"] for r in records]]
    for t in range(2):
        conversations = answered_conversations(prompts, texts, [instructions], t)
        completions = [[{"role": "assistant", "content": text}] for text in texts[t]]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts[t]]
        per_func = trainer._calculate_rewards(inputs, conversations, completions, ids)
        expected = combine_rewards(per_func, trainer.reward_weights, trainer.reward_clip_range)
        assert [r[f"reward_{t + 1}"] for r in records] == pytest.approx(expected.tolist())
    # The weights and the clip matter here: an unweighted sum would differ
    unweighted = [
        letter + word
        for letter, word in zip(
            letter_reward([[{"content": x}] for x in texts[1]]),
            word_reward([[{"content": x}] for x in texts[1]], answer=[row["answer"] for row in inputs]),
            strict=True,
        )
    ]
    assert [r["reward_2"] for r in records] != pytest.approx(unweighted)
