"""Counting wrong attempts that give a worked example's answer (`experiments.copies`), on hand-made records and the
plain-prompt Gemma recipe's real template."""

import json
from pathlib import Path

import yaml

from experiments.copies import copied_answers, main, worked_answers


RECIPE = Path(__file__).parents[1] / "recipes" / "reproduce" / "gemma3_270m_plain.yaml"


def test_worked_answers_of_the_recipe_template():
    template = yaml.safe_load(RECIPE.read_text())["plain_prompt_template"]
    assert worked_answers(template) == {"25", "187", "0", "20"}
    # The question's own "Answer:" slot (after {question}) is not a worked example
    assert worked_answers("Q: 1+1\nAnswer: 2\n\nQ: {question}\nAnswer: 7\n") == {"2"}


def test_copied_answers_counts_only_wrong_attempts_by_last_number():
    records = [
        {"attempt_1": " 20\n", "reward_1": 0.0, "attempt_2": " 25\n\n", "reward_2": 0.0},  # both copies
        {"attempt_1": " 20\n", "reward_1": 1.0, "attempt_2": " 187.0\n", "reward_2": 0.0},  # right; 187 canonical
        {"attempt_1": " 21\n", "reward_1": 0.0, "attempt_2": " 20 or 19", "reward_2": 0.0},  # last number 19
        {"attempt_1": " 200\n", "reward_1": 0.0, "attempt_2": "", "reward_2": 0.0},  # 200 is not 20; no number
    ]
    assert copied_answers(records, {"20", "25", "187"}) == {"problems": 4, "attempt_1": 1, "attempt_2": 2}


def test_main_writes_copies_json(tmp_path):
    row = {"attempt_1": " 0\n", "reward_1": 0.0, "attempt_2": " 187\n", "reward_2": 0.0}
    for folder in ("base", "seed0/score"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "records.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    table = main(str(RECIPE), str(tmp_path))
    assert table == json.loads((tmp_path / "copies.json").read_text())
    assert table["worked_answers"] == ["0", "20", "25", "187"]
    assert table["arms"] == {a: {"problems": 2, "attempt_1": 2, "attempt_2": 2} for a in ("base", "seed0/score")}
