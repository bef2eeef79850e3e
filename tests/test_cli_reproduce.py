"""The reproduction's parts: the arithmetic generator and its splits, the numeric reward, the training curves, and the
whole `score-reproduce` pipeline on the tiny local model."""

import json
import re
import sys

import pytest

from score_trl.cli.arithmetic import WORDS, facts, make_splits, solve
from score_trl.cli.curves import moving_average, reward_series
from score_trl.rewards import last_number, numeric_reward


_QUESTION = re.compile(r"What is (\w+) (\+|-|×|plus|minus|times) (\w+)\?")
_OP = {"+": "+", "plus": "+", "-": "-", "minus": "-", "×": "*", "times": "*"}


def parse(question: str) -> tuple[int, str, int]:
    a, op, b = _QUESTION.fullmatch(question).groups()
    number = lambda x: int(x) if x.isdigit() else WORDS.index(x)  # noqa: E731
    return number(a), _OP[op], number(b)


def fact_of(question: str) -> tuple[int, str, int]:
    a, op, b = parse(question)
    return (min(a, b), op, max(a, b)) if op != "-" else (a, op, b)


def test_facts_are_distinct_and_answers_right():
    pool = facts(20)
    assert len(pool) == len(set(pool)) == 231 + 231 + 231  # a <= b for + and x, a >= b for -, operands 0..20
    splits = make_splits(seed=3)
    for rows in splits.values():
        for row in rows:
            a, op, b = parse(row["question"])
            assert int(row["answer"]) == solve(a, op, b) >= 0


def test_splits_are_disjoint_seeded_and_sized():
    splits = make_splits(seed=0, n_test=320, n_validation=120)
    assert (len(splits["test"]), len(splits["validation"])) == (320, 120)
    seen = {name: {fact_of(row["question"]) for row in rows} for name, rows in splits.items()}
    assert not seen["test"] & seen["train"] and not seen["test"] & seen["validation"]
    assert not seen["validation"] & seen["train"]
    assert len(seen["test"]) == 320  # each test fact asked once
    assert len(seen["train"]) == 693 - 320 - 120
    words = [any(w in row["question"] for w in ("plus", "minus", "times")) for row in splits["test"]]
    assert 0.35 < sum(words) / len(words) < 0.65  # both wordings in the test split
    assert make_splits(seed=0) == splits
    assert make_splits(seed=1)["test"] != splits["test"]
    with pytest.raises(ValueError, match="n_test"):
        make_splits(n_test=600, n_validation=100)


def test_numeric_reward_reads_the_last_number():
    completions = [
        [{"role": "assistant", "content": text}]
        for text in ("7 + 5 = 12", "The answer is 12.", "12, 13 or 14", "It is 1,000.", "twelve", "12.0")
    ]
    answers = ["12", "12", "12", "1000", "12", "12"]
    assert numeric_reward(completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert numeric_reward(completions[:1], answer=[None]) == [None]
    assert last_number("no digits") is None


def test_reward_series_from_score_and_rloo_logs():
    score = [
        {"step": 1, "turn1/reward": 0.25, "turn2/reward": 0.5},
        {"step": 2, "turn1/reward": 0.5, "turn2/reward": 0.25},
        {"step": 2, "train_runtime": 3.0},
    ]
    series = reward_series(score)
    assert series["turn1"] == [(1, 0.25), (2, 0.5)]
    assert series["delta"] == [(1, 0.25), (2, -0.25)]
    rloo = reward_series([{"step": 1, "reward": 0.75}])
    assert rloo == {"turn1": [(1, 0.75)], "turn2": [], "delta": []}
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize("recipe", ["smollm2_cpu.yaml", "gpu.yaml"])
def test_reproduction_recipes_parse(recipe):
    from pathlib import Path

    from score_trl.cli.reproduce import ARMS, parse_args

    args = parse_args([str(Path(__file__).resolve().parents[1] / "recipes" / "reproduce" / recipe)])
    assert args.arms == ["base", "score", "rloo", "score_no_stage1", "score_alpha0"] and set(args.arms) == set(ARMS)
    assert (args.alpha, args.beta, args.beta2) == (10.0, 0.01, 0.1)  # the paper's
    assert 0 < args.stage_one_steps < args.max_steps and args.eval_split == "test" and args.n_test >= 300


def test_reproduce_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    """Every arm trains (2 steps) and is evaluated; the tables, curves and records come from files the run wrote, and
    a rerun replaces the chosen arms unless resuming."""
    from score_trl.cli.reproduce import ARMS, main, parse_args

    argv = [
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"),
        "--work_dir", str(tmp_path / "work"), "--max_steps", "2", "--stage_one_steps", "1", "--prompts_per_step",
        "2", "--num_generations", "2", "--max_completion_length", "4", "--eval_max_new_tokens", "4",
        "--n_test", "12", "--n_validation", "6", "--eval_batch_size", "8",
    ]  # fmt: skip
    args = parse_args(argv)
    args.gguf_file = None
    output = main(args)
    for arm in ARMS:
        summary = json.loads((output / arm / "summary.json").read_text())
        assert summary["n"] == 12 and summary["num_attempts"] == 2
        records = [json.loads(line) for line in (output / arm / "records.jsonl").read_text().splitlines()]
        assert len(records) == 12 and all("attempt_2" in r for r in records)
        run = json.loads((output / arm / "run.json").read_text())  # provenance, written by the run
        assert len(run["commit"]) == 40 and isinstance(run["dirty"], bool) and run["versions"]["trl"] == "1.16.0"
        assert run["command"][0] == sys.executable and run["peak_rss_mib"] > 100 and run["wall_seconds"] > 0
        if arm != "base":
            history = json.loads((output / arm / "log_history.json").read_text())
            assert [e["step"] for e in history if "loss" in e] == [1, 2]
    stages = [e.get("stage") for e in json.loads((output / "score_no_stage1" / "log_history.json").read_text())]
    assert 1.0 not in stages
    table = (output / "results.md").read_text()
    assert all(f" {arm} " in table for arm in ARMS) and "Accuracy@t1" in table
    for png in ("curves.png", "comparison.png"):
        assert (output / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mtime = {arm: (output / arm / "summary.json").stat().st_mtime_ns for arm in ARMS}
    args.resume = True
    main(args)  # a stopped run continues: finished arms are kept, not redone
    assert {arm: (output / arm / "summary.json").stat().st_mtime_ns for arm in ARMS} == mtime
    args.resume, args.arms = False, ["base"]
    main(args)  # a rerun replaces the chosen arm only
    assert (output / "base" / "summary.json").stat().st_mtime_ns != mtime["base"]
    assert (output / "score" / "summary.json").stat().st_mtime_ns == mtime["score"]
