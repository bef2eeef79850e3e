"""Plain-text (standard) prompts, for base models: the correction appended as text (`plain_correction_format`) from
token ids, stop strings, TRL's plain-prompt RLOO training test ported, and evaluation built the same way."""

import json

import pytest
import torch
from datasets import Dataset

from score_trl import SCoReConfig
from score_trl.evaluation import evaluate
from score_trl.generation import TransformersGenerator, cut_at_stop_strings, prompt_ids
from score_trl.scoring import answered_conversations
from score_trl.turns import instruction_for, plain_bridge

from conftest import TOY_WORDS, toy_question


FORMAT = "\n\n{correction}\n\n"


def plain_dataset(n: int = 8) -> Dataset:
    words = [TOY_WORDS[i % len(TOY_WORDS)] for i in range(n)]
    return Dataset.from_dict({"prompt": [toy_question(w) for w in words], "answer": words})


def text_reward(completions, answer, **kwargs):
    """The share of letters in the completion, plus 1 when it holds the answer word: a dense signal (every group can
    learn) on completions that are strings, as TRL passes completions of plain-text prompts."""
    assert all(isinstance(c, str) for c in completions), "plain-text prompts get plain-text completions"
    return [sum(ch.isalpha() for ch in c) / max(len(c), 1) + float(a in c) for c, a in zip(completions, answer,
                                                                                            strict=True)]  # fmt: skip


def plain_trainer(tmp_path, model_dir, tokenizer, **kwargs):
    from score_trl import SCoReTrainer

    from conftest import make_args

    return SCoReTrainer(model_dir, reward_funcs=text_reward, args=make_args(tmp_path, **kwargs),
                        train_dataset=plain_dataset(), processing_class=tokenizer)  # fmt: skip


def test_plain_turn_is_its_own_tokens_after_the_sampled_ones(tokenizer):
    text = FORMAT.format(correction="Fix it.")
    bridge = plain_bridge(tokenizer, text)
    assert bridge.close_ids == () and tokenizer.decode(bridge.instruction_ids) == text
    # Whatever the attempt ends with, the turn follows its tokens unchanged (never merged across the boundary)
    y1 = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    assert bridge.after(y1) == list(bridge.instruction_ids)
    context = prompt_ids(tokenizer, [toy_question("cat")])[0] + y1 + bridge.after(y1)
    assert tokenizer.decode(context, skip_special_tokens=True) == toy_question("cat") + "the cat" + text
    # A turn the tokenizer cannot give back as the same text is refused (it would not be the text it claims): here a
    # tokenizer that lower-cases its input
    from tokenizers import normalizers

    from conftest import build_tokenizer

    lowering = build_tokenizer()
    lowering.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match="does not round-trip the plain correction turn"):
        plain_bridge(lowering, "\n\nFix it.\n\n")


def test_stop_strings_cut_at_the_token_that_completes_the_first():
    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    ids = tokenizer("red\n\nQuestion: blue\n\nQuestion: cat", add_special_tokens=False)["input_ids"]
    (cut,) = cut_at_stop_strings([ids], tokenizer, ["\n\nQuestion:"])
    assert tokenizer.decode(cut) == "red\n\nQuestion:"  # the first occurrence, the stop string kept (as EOS is)
    assert cut_at_stop_strings([ids], tokenizer, ["moon"]) == [ids]  # no stop string: untouched
    assert cut_at_stop_strings([ids], tokenizer, None) == [ids]


def test_answered_text_of_a_plain_prompt():
    texts = [["y1"], ["y2"]]
    assert answered_conversations(["x"], texts, [["Fix."]], 1, FORMAT) == ["xy1\n\nFix.\n\n"]
    assert answered_conversations(["x"], texts, [["Fix."]], 1, "\nQ: {correction}\nA:") == ["xy1\nQ: Fix.\nA:"]


def test_training_with_plain_prompts_updates_the_model(tmp_path, tiny_model_dir, tokenizer):
    # Ported from TRL's RLOOTrainer test of the standard prompt-only format (trl tests/test_rloo_trainer.py,
    # test_training with "standard_prompt_only"): train, then every trainable parameter has moved
    trainer = plain_trainer(tmp_path, tiny_model_dir, tokenizer, max_steps=2, stage_one_steps=1)
    before = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert len(moved) == len(before)


def test_plain_rollout_layout_and_stop_strings(tmp_path, tiny_model_dir, tokenizer):
    trainer = plain_trainer(tmp_path, tiny_model_dir, tokenizer, max_completion_length=8, stop_strings=["moon"])
    trainer.model.train()
    rows = [{"prompt": toy_question(w), "answer": w} for w in ("cat", "green") for _ in range(2)]
    batch = trainer._generate_and_score_completions(rows)
    bridge = trainer._turns.bridge(instruction_for({}), plain=True)
    assert tokenizer.decode(bridge.instruction_ids) == trainer.args.plain_correction_format.format(
        correction=instruction_for({})
    )
    for ids, mask, turns in zip(batch["completion_ids"], batch["completion_mask"], batch["turn_ids"], strict=True):
        ids, turns = ids[mask.bool()].tolist(), turns[mask.bool()].tolist()
        first = turns.count(1)
        y1 = ids[:first]
        assert ids[first : first + len(bridge.instruction_ids)] == list(bridge.instruction_ids)
        assert turns[first : first + len(bridge.instruction_ids)] == [0] * len(bridge.instruction_ids)
        text = tokenizer.decode(y1, skip_special_tokens=True)
        assert "moon" not in text or text.endswith("moon")  # cut right after the stop string
    # The table's completion is the continuation as text: y1, the correction turn, y2
    logs = trainer._attempt_logs
    assert trainer._logs["completion"][0] == (
        logs["attempt_1"][0] + FORMAT.format(correction=instruction_for({})) + logs["attempt_2"][0]
    )
    assert trainer._is_truncated([tokenizer("the moon", add_special_tokens=False)["input_ids"]]) == [False]


def test_plain_evaluation_builds_the_turn_as_training_does(tmp_path, tiny_model, tokenizer):
    rows = plain_dataset(4)
    generator = TransformersGenerator(tiny_model, tokenizer, max_new_tokens=6)
    evaluate(generator, tokenizer, rows, [text_reward], output_jsonl=tmp_path / "r.jsonl", progress=False,
             correction_feedback="verdict")  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["question"] for r in records] == list(rows["prompt"])
    prompts = prompt_ids(tokenizer, list(rows["prompt"]))
    y1 = generator(prompts)
    for k, record in enumerate(records):
        correction = f"{record['feedback_1']}\n\n{instruction_for({})}"
        context = prompts[k] + y1[k] + list(plain_bridge(tokenizer, FORMAT.format(correction=correction)).after([]))
        assert record["attempt_2"] == tokenizer.decode(generator([context])[0], skip_special_tokens=True)


def test_prompt_formats_are_checked_first():
    from datasets import IterableDataset

    from score_trl.inputs import check_dataset

    chat = [{"role": "user", "content": "Two?"}]
    rows = [{"prompt": "What is one?", "answer": "x"}, {"prompt": chat, "answer": "y"}]
    mixed = IterableDataset.from_generator(lambda: iter(rows))  # Arrow would refuse a mixed column; a stream does not
    with pytest.raises(ValueError, match="mixes conversational and plain-text prompts"):
        check_dataset(mixed, "train_dataset")
    with pytest.raises(ValueError, match=r"row 1: 'prompt' must be conversational .* or a string .* got int"):
        check_dataset(Dataset.from_list([{"prompt": 3}, {"prompt": 4}]), "train_dataset")
    assert check_dataset(plain_dataset(2), "train_dataset")[0]["prompt"] == toy_question("red")


def test_plain_format_must_hold_the_correction(tmp_path):
    with pytest.raises(ValueError, match="plain_correction_format='\\\\n\\\\nA:' has no {correction}"):
        SCoReConfig(output_dir=str(tmp_path), use_cpu=True, plain_correction_format="\n\nA:")
