"""`correction_feedback`: the verifier's feedback in the correction turn (`score_trl.feedback`), in training and in
evaluation: verdict bits against the rewards, the visible-tests report from the sandbox on real MBPP problems, no
leak of gold answers or hidden tests over whole datasets, the turn built from token ids, and the early errors."""

import json
import math
import re
from itertools import groupby

import pytest
import torch

from score_trl import SCoReConfig
from score_trl.cli.report import markdown_table
from score_trl.data import to_score_rows
from score_trl.evaluation import evaluate, summarize
from score_trl.feedback import (
    TESTS_PASSED,
    TRUNCATION_MARK,
    VERDICT_CORRECT,
    VERDICT_INCORRECT,
    CorrectionTurns,
    FeedbackError,
    check_feedback,
    correction_text,
    doctest_asserts,
    told_incorrect,
    truncate,
    verdict_feedback,
    visible_tests_feedback,
    visible_tests_program,
)
from score_trl.generation import TransformersGenerator, generate_attempts, prompt_ids
from score_trl.rewards import code_execution_reward, reference_answer
from score_trl.turns import find_turn_bridge, instruction_for

from conftest import SHARED_DATA, grouped_inputs, make_trainer, toy_dataset, toy_question


def parity_reward(completions, **kwargs):
    """0/1 by the parity of the completion's length: a mix of right and wrong attempts from any model."""
    return [float(len(c[0]["content"]) % 2 == 0) for c in completions]


def mbpp_rows(n: int | None = None) -> list[dict]:
    path = SHARED_DATA / "mbpp" / "mbpp.jsonl"
    if not path.is_file():
        pytest.skip(f"MBPP is not in {path} (the workplace's shared data)")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return to_score_rows(rows[:n] if n else rows, source="mbpp")


def hidden_tests(row: dict) -> list[str]:
    """The tests the reward runs and the feedback never shows."""
    shown = set(row["visible_tests"])
    return [t for t in [*row["test_list"], *(row.get("challenge_test_list") or [])] if t not in shown]


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts


def test_verdict_is_one_bit_of_the_reward():
    rewards = [1.0, 0.0, None, 0.5, 0.49, math.nan]
    expected = [VERDICT_CORRECT, VERDICT_INCORRECT, None, VERDICT_CORRECT, VERDICT_INCORRECT, None]
    assert verdict_feedback(rewards=rewards) == expected
    assert verdict_feedback(rewards=[0.7], threshold=0.8) == [VERDICT_INCORRECT]


def test_correction_text_puts_the_feedback_before_the_instruction():
    assert correction_text("Fix it.", None) == "Fix it."
    assert correction_text("Fix it.", " Wrong.\n") == "Wrong.\n\nFix it."


def test_told_incorrect_reads_the_message_and_for_a_judge_the_reward():
    assert told_incorrect(VERDICT_INCORRECT, 1.0) and not told_incorrect(VERDICT_CORRECT, 0.0)
    assert not told_incorrect(TESTS_PASSED, 0.0) and told_incorrect("Your code failed this test:\nassert f()", 1.0)
    assert told_incorrect("Looks off.", 0.0) and not told_incorrect("Looks off.", 1.0)
    assert not told_incorrect(None, 0.0)


def test_feedback_that_is_not_a_string_names_the_function_and_the_row():
    assert check_feedback("judge", ["a", None], 2) == ["a", None]
    with pytest.raises(FeedbackError, match=r"'judge' returned int 3 for row 2"):
        check_feedback("judge", ["a", 3], 2)
    with pytest.raises(FeedbackError, match=r"'judge' returned 1 values; expected a list of 2"):
        check_feedback("judge", ["a"], 2)


def test_feedback_over_budget_is_cut(tokenizer):
    text = " ".join(["red"] * 40)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["re", "d", "Ġred"]  # BPE: the first word is two tokens
    cut, was_cut = truncate(tokenizer, text, 5)
    assert was_cut and cut == "red red red red" + TRUNCATION_MARK  # 5 tokens: "re", "d" and three " red"
    assert truncate(tokenizer, text, len(ids)) == (text, False)
    assert truncate(tokenizer, None, 5) == (None, False)


def test_none_builds_todays_turn_token_for_token(tokenizer):
    turns = CorrectionTurns(tokenizer)
    rows = [{"prompt": [{"role": "user", "content": toy_question("cat")}]}] * 2
    instructions = [instruction_for({}), "Try again."]
    texts, bridges, feedback, cut = turns.after(rows, instructions, [r["prompt"] for r in rows], ["a", "b"],
                                                [[5], [6]], [1.0, 0.0])  # fmt: skip
    assert texts == instructions and feedback == [None, None] and cut == 0
    assert bridges == [find_turn_bridge(tokenizer, text) for text in instructions]


def test_verdict_turn_is_the_templates_rendering_of_the_conversation(tokenizer):
    # x + y1 + the verdict turn, built from ids, equals the template's rendering of that conversation, tokenized
    turns = CorrectionTurns(tokenizer, correction_feedback="verdict")
    prompt = [{"role": "user", "content": toy_question("cat")}]
    y1 = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    texts, bridges, feedback, _ = turns.after([{"prompt": prompt}] * 2, ["Fix it."] * 2, [prompt] * 2,
                                              ["the cat"] * 2, [y1, y1], [0.0, 1.0])  # fmt: skip
    assert feedback == [VERDICT_INCORRECT, VERDICT_CORRECT]
    for text, bridge in zip(texts, bridges, strict=True):
        built = prompt_ids(tokenizer, [prompt])[0] + y1 + bridge.after(y1)
        conversation = [*prompt, {"role": "assistant", "content": "the cat"}, {"role": "user", "content": text}]
        rendered = prompt_ids(tokenizer, [conversation])[0]
        assert built == rendered
    assert VERDICT_INCORRECT in tokenizer.decode(bridges[0].instruction_ids)


def test_doctest_examples_are_humaneval_visible_tests():
    prompt = 'def add(a, b):\n    """Add.\n    >>> add(1, 2)\n    3\n    >>> add(-1, 1)\n    0\n    """\n'
    assert doctest_asserts(prompt, "add") == ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    # examples whose output is not a literal, or that do not call the function, are not tests
    assert doctest_asserts('def f():\n    """\n    >>> f()\n    <object>\n    >>> g()\n    1\n    """\n', "f") == []


# ---------------------------------------------------------------------------------------------------------------------
# Code: the visible tests in the sandbox, on real MBPP problems

RIGHT_IS_NOT_PRIME = (
    "```python\nimport math\ndef is_not_prime(n):\n    return any(n % i == 0 for i in range(2, n))\n```"
)


def test_tests_feedback_on_mbpp_names_the_failing_assertion_and_never_a_hidden_test():
    rows = mbpp_rows(3)  # min_cost, similar_elements, is_not_prime
    assert [row["visible_tests"] for row in rows] == [row["test_list"][:1] for row in rows]
    completions = [
        "```python\ndef min_cost(cost, m, n):\n    return 0\n```",  # wrong: fails the visible assert
        "```python\ndef similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n```",  # right
        "```python\ndef is_not_prime(n):\n    return False\n```",  # passes the visible test, fails a hidden one
    ]
    as_chat = [[{"role": "assistant", "content": c}] for c in completions]
    columns = {key: [row.get(key) for row in rows] for key in ("visible_tests", "test_setup_code")}
    feedback = visible_tests_feedback(None, as_chat, **columns)
    assert feedback[0] == f"Your code failed this test:\n{rows[0]['test_list'][0]}"
    assert feedback[1] == feedback[2] == TESTS_PASSED
    # The reward still runs every test: the third passes what it was shown and fails what it was not
    rewards = code_execution_reward(as_chat, test_list=[row["test_list"] for row in rows])
    assert rewards == [0.0, 1.0, 0.0]
    for row, text in zip(rows, feedback, strict=True):
        assert not any(test in text for test in hidden_tests(row))
    # Exceptions are named with their message; a syntax error in the code itself too
    broken = [[{"role": "assistant", "content": c}] for c in ("def min_cost(:", "def min_cost(c, m, n):\n    1/0")]
    messages = visible_tests_feedback(
        None, broken, visible_tests=[rows[0]["visible_tests"]] * 2, test_setup_code=[""] * 2
    )
    assert messages[0].startswith("Running your code raised SyntaxError:")
    assert messages[1] == f"This test raised ZeroDivisionError: division by zero:\n{rows[0]['test_list'][0]}"


def appears(test: str, program: str) -> bool:
    """The test's text is in the program, as written or as a string literal there (quotes escaped)."""
    return test in program or repr(test)[1:-1] in program


def test_no_hidden_test_reaches_the_sandbox_over_all_of_mbpp():
    raw = [json.loads(line) for line in (SHARED_DATA / "mbpp" / "mbpp.jsonl").read_text().splitlines()]
    rows = mbpp_rows()
    assert len(rows) == len(raw) > 900
    for source, row in zip(raw, rows, strict=True):
        shown = row["visible_tests"]
        hidden = [t for t in [*source["test_list"], *source.get("challenge_test_list", [])] if t not in shown]
        program = visible_tests_program(source["code"], shown, row.get("test_setup_code"), "m")
        assert shown == source["test_list"][:1] and appears(shown[0], program)
        leaked = [test for test in hidden if appears(test, program)]
        assert not leaked, (row["task_id"], leaked)


@pytest.mark.parametrize("task", ["gsm8k", "math"])
def test_no_gold_answer_in_verdict_turns_over_a_whole_dataset(task, tokenizer):
    path = SHARED_DATA / task / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the workplace's shared data)")
    rows = to_score_rows([json.loads(line) for line in path.read_text().splitlines()], source=task)
    turns = CorrectionTurns(tokenizer, correction_feedback="verdict")
    for reward in (0.0, 1.0):
        texts, _, feedback, _ = turns.after(rows, [r["correction_instruction"] for r in rows],
                                            [r["prompt"] for r in rows], ["0"] * len(rows), [[]] * len(rows),
                                            [reward] * len(rows))  # fmt: skip
        for row, text, said in zip(rows, texts, feedback, strict=True):
            gold = reference_answer(row.get("answer"), row.get("solution"))
            assert said in (VERDICT_CORRECT, VERDICT_INCORRECT)
            assert gold is None or not re.search(rf"(?<![\w.]){re.escape(gold)}(?![\w.])", said), (gold, said)
            assert text == f"{said}\n\n{row['correction_instruction']}"


@pytest.mark.real_model
def test_mbpp_feedback_end_to_end_through_the_evaluation(tmp_path):
    # Real MBPP rows, the real SmolLM2 tokenizer and template, the sandbox: a scripted "model" answers each problem
    # wrongly first; the second attempt's prompt must carry the failing visible assert and no hidden test.
    from test_real_models import model_dir

    from score_trl.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir("smollm2"))
    rows = mbpp_rows(3)
    first = ["def min_cost(cost, m, n):\n    return 0", "def similar_elements(a, b):\n    return ()",
             "def is_not_prime(n):\n    return n"]  # fmt: skip
    second = ["```python\nR = 3\ndef min_cost(cost, m, n):\n    return 8 if cost[0][0] == 1 else 12\n```",
              "```python\ndef similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n```",
              RIGHT_IS_NOT_PRIME]  # fmt: skip
    contexts = []

    def scripted(prompt_ids):
        contexts.append(prompt_ids)
        texts = first if len(contexts) == 1 else second
        return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]

    summary = evaluate(scripted, tokenizer, rows, [code_execution_reward], correction_feedback="tests",
                       output_jsonl=tmp_path / "records.jsonl", progress=False)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    turn_two = [tokenizer.decode(ids) for ids in contexts[1]]
    for row, record, context in zip(rows, records, turn_two, strict=True):
        assert record["feedback_1"] == f"Your code failed this test:\n{row['visible_tests'][0]}"
        assert record["feedback_1"] + "\n\n" + row["correction_instruction"] in context
        # the prompt lists test_list, as MBPP's standard prompt does; the correction turn repeats none but the first
        turn = context.split(first[rows.index(row)], 1)[1]
        assert not any(test in turn for test in hidden_tests(row))
    assert [r["reward_1"] for r in records] == [0.0, 0.0, 0.0]
    assert [r["reward_2"] for r in records] == [0.0, 1.0, 1.0]  # min_cost's fix only fits the visible test
    assert summary["correction_feedback"] == "tests" and summary["told_incorrect_t1"] == 1.0
    assert summary["incorrect_to_correct"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def walk_turns(ids: list[int], turns: list[int]):
    """(attempts, injected turns) of one packed training row: its runs of attempt tokens and of turn id 0."""
    runs = [(turn, [i for i, _ in group]) for turn, group in groupby(zip(ids, turns, strict=True), key=lambda x: x[1])]
    assert [turn for turn, _ in runs] == [1, 0, 2, 0, 3]
    return [run for turn, run in runs if turn], [run for turn, run in runs if not turn]


def test_verdict_turns_in_training_follow_each_attempts_reward(tmp_path, tiny_model_dir, tokenizer):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, reward=parity_reward, correction_feedback="verdict",
                           num_attempts=3, max_completion_length=6, per_device_train_batch_size=8)  # fmt: skip
    trainer.model.train()
    batch = trainer._generate_and_score_completions(grouped_inputs(trainer, ("cat", "green", "sun", "moon")))
    logs, instruction = trainer._attempt_logs, instruction_for({})
    said = {1: [], 2: []}
    for i, (ids, mask, turns) in enumerate(zip(batch["completion_ids"], batch["completion_mask"], batch["turn_ids"],
                                               strict=True)):  # fmt: skip
        attempts, injected = walk_turns(ids[mask.bool()].tolist(), turns[mask.bool()].tolist())
        for t in (1, 2):
            verdict = VERDICT_CORRECT if logs[f"reward_{t}"][i] >= 0.5 else VERDICT_INCORRECT
            said[t].append(verdict)
            bridge = trainer._turns.bridge(correction_text(instruction, verdict))
            assert injected[t - 1] == bridge.after(attempts[t - 1])  # feedback on the attempt just made
    assert {v for values in said.values() for v in values} == {VERDICT_CORRECT, VERDICT_INCORRECT}  # both seen
    metrics = trainer._metrics["train"]
    for t in (1, 2):
        share = sum(v == VERDICT_INCORRECT for v in said[t]) / len(said[t])
        assert metrics[f"feedback/told_incorrect_after_turn{t}"] == [pytest.approx(share)]
    assert metrics["self_correction/told_incorrect"] == metrics["feedback/told_incorrect_after_turn2"]
    assert metrics["feedback/truncated_after_turn1"] == [0.0]
    # The completions table logs what each attempt answered, the conversation included the feedback
    conversation = trainer._logs["completion"][0]
    assert conversation[1]["content"] == correction_text(instruction, said[1][0])


def test_verdict_training_runs_both_stages_with_three_attempts(tmp_path, tiny_model_dir, tokenizer):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, reward=parity_reward, correction_feedback="verdict",
                           num_attempts=3, max_completion_length=6, max_steps=2, stage_one_steps=1)  # fmt: skip
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["stage"] for h in history] == [1.0, 2.0]
    assert all(0.0 <= h["self_correction/told_incorrect"] <= 1.0 for h in history)


def test_long_feedback_is_cut_to_the_budget_and_counted(tmp_path, tiny_model_dir, tokenizer):
    from feedback_funcs import long_judge

    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, correction_feedback=long_judge,
                           feedback_max_tokens=8)  # fmt: skip
    assert trainer.args.correction_feedback == "feedback_funcs.long_judge"  # the config stays serializable
    trainer.model.train()
    inputs = grouped_inputs(trainer)
    batch = trainer._generate_and_score_completions(inputs)
    assert trainer._metrics["train"]["feedback/truncated_after_turn1"] == [float(len(inputs))]
    injected = tokenizer.decode(batch["completion_ids"][0][batch["turn_ids"][0] == 0].tolist())
    assert "very very" in injected and "long feedback" not in injected


def test_judge_receives_the_rewards_and_evaluation_uses_it_the_same_way(tmp_path, tiny_model_dir, tokenizer):
    from feedback_funcs import echo_length

    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, reward=parity_reward, correction_feedback=echo_length)
    trainer.model.train()
    trainer._generate_and_score_completions(grouped_inputs(trainer))
    logs = trainer._attempt_logs
    conversation = trainer._logs["completion"][0]
    expected = f"Your reply has {len(logs['attempt_1'][0])} characters; reward {logs['reward_1'][0]}."
    assert conversation[1]["content"] == correction_text(instruction_for({}), expected)


@pytest.mark.parametrize(
    "settings, error",
    [
        (
            {"correction_feedback": "feedback_funcs.not_a_string"},
            r"'feedback_funcs.not_a_string' returned int 3 for row 2",
        ),
        ({"correction_feedback": "tests"}, r"no `visible_tests` column.*test_list'\]\[:1\]"),
        ({"correction_feedback": "no_such_module.judge"}, r"cannot load the function"),
    ],
    ids=["non_string", "tests_without_visible_tests", "missing_function"],
)
def test_bad_feedback_fails_before_training(tmp_path, tiny_model_dir, tokenizer, settings, error):
    with pytest.raises((ValueError, FeedbackError), match=error):
        make_trainer(tmp_path, tiny_model_dir, tokenizer, **settings)


def test_unknown_feedback_mode_fails_in_the_config(tmp_path):
    with pytest.raises(ValueError, match=r"correction_feedback='verdicts': use one of \['none', 'verdict', 'tests'\]"):
        SCoReConfig(output_dir=str(tmp_path), use_cpu=True, correction_feedback="verdicts")
    with pytest.raises(ValueError, match="feedback_max_tokens=0"):
        SCoReConfig(output_dir=str(tmp_path), use_cpu=True, feedback_max_tokens=0)


def test_slow_feedback_stops_training_under_reward_timeout(tmp_path, tiny_model_dir, tokenizer):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, correction_feedback="feedback_funcs.slow_on_answers",
                           reward_timeout=0.5)  # fmt: skip
    with pytest.raises(FeedbackError, match=r"'feedback_funcs.slow_on_answers' did not return within 0.5 s on attempt "
                                            r"1 at step 0"):  # fmt: skip
        trainer.train()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def test_evaluation_builds_the_turns_as_training_does(tmp_path, tiny_model, tokenizer):
    rows = toy_dataset(6)
    generator = TransformersGenerator(tiny_model, tokenizer, max_new_tokens=6)
    plain = evaluate(generator, tokenizer, rows, [parity_reward], output_jsonl=tmp_path / "none.jsonl", progress=False)
    told = evaluate(generator, tokenizer, rows, [parity_reward], output_jsonl=tmp_path / "verdict.jsonl",
                    progress=False, correction_feedback="verdict")  # fmt: skip
    none_records = [json.loads(line) for line in (tmp_path / "none.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (tmp_path / "verdict.jsonl").read_text().splitlines()]
    # none: the attempts of the instruction-only roll-out, token for token
    attempts = generate_attempts(generator, tokenizer, [r["prompt"] for r in rows], [instruction_for({})] * 6)
    assert [r["attempt_2"] for r in none_records] == tokenizer.batch_decode(attempts[1], skip_special_tokens=True)
    assert "feedback_1" not in none_records[0] and plain["correction_feedback"] == "none"
    # verdict: the feedback follows the first reward, and the second attempt was generated after that turn
    assert [r["feedback_1"] for r in records] == verdict_feedback(rewards=[r["reward_1"] for r in records])
    prompts = prompt_ids(tokenizer, [r["prompt"] for r in rows])
    y1 = attempts[0]
    for k, record in enumerate(records):
        bridge = find_turn_bridge(tokenizer, correction_text(instruction_for({}), record["feedback_1"]))
        y2 = generator([prompts[k] + y1[k] + bridge.after(y1[k])])[0]
        assert record["attempt_2"] == tokenizer.decode(y2, skip_special_tokens=True)
    share = sum(r["feedback_1"] == VERDICT_INCORRECT for r in records) / len(records)
    assert told["correction_feedback"] == "verdict" and told["told_incorrect_t1"] == pytest.approx(share)
    assert summarize(records)["told_incorrect_t1"] == told["told_incorrect_t1"]
    table = markdown_table([plain, told], ["intrinsic", "verdict"])
    assert "| correction feedback | none | verdict |" in table
    assert f"| told incorrect (before the last attempt) | – | {100 * share:.1f} |" in table


def test_feedback_rows_never_train_their_tokens(tmp_path, tiny_model_dir, tokenizer):
    # The injected turn (feedback + instruction) is attended to but has turn id 0: no loss, no KL, no LM head
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, reward=parity_reward, correction_feedback="verdict")
    trainer.model.train()
    batch = trainer._generate_and_score_completions(grouped_inputs(trainer))
    verdict_ids = set(tokenizer(VERDICT_INCORRECT, add_special_tokens=False)["input_ids"])
    injected = batch["completion_ids"][(batch["turn_ids"] == 0) & batch["completion_mask"].bool()]
    assert verdict_ids & set(injected.tolist())
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logps, _, _ = trainer._turn_logps(trainer.model, input_ids, mask, batch["turn_ids"] > 0)
    assert torch.all(logps[batch["turn_ids"] == 0] == 0)
