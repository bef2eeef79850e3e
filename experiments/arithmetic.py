"""A seeded generator of small-number arithmetic problems with disjoint train / validation / test splits: the task of
the reproduction (`experiments.reproduce`), sized so that a 135M-parameter model solves some of it and has room to
learn and to correct.

A problem is a fact (a, op, b) with operands in [0, max_operand] and op in +, −, × (a ≥ b for −, so answers stay
non-negative), asked in symbols ("What is 7 + 12?") or in words ("What is seven plus twelve?"). Splits are made over
facts, with a + b and b + a (and a × b, b × a) one fact, so no test question is a train question re-worded or with its
operands swapped.

With `two_choices`, each question also offers its answer and one distractor (the answer ± 1 or 2, never negative) in
random order: "What is 7 + 12? Is it 19 or 21?". A verdict then tells a model everything it needs for its second
attempt (after "incorrect", the other choice is right), which makes this the setting where a correction turn that
carries feedback certainly has something to learn (issue 32's positive control).
"""

import json
import random
from pathlib import Path


WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty"
).split()
OPERATORS = {"+": ("+", "plus"), "-": ("-", "minus"), "*": ("×", "times")}


def facts(max_operand: int = 20) -> list[tuple[int, str, int]]:
    """Every distinct fact: commutative operations once (a ≤ b), subtraction with a ≥ b."""
    out = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            if a <= b:
                out += [(a, "+", b), (a, "*", b)]
            if a >= b:
                out.append((a, "-", b))
    return sorted(out)


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def question(a: int, op: str, b: int, words: bool) -> str:
    symbol, word = OPERATORS[op]
    if words:
        if max(a, b) >= len(WORDS):
            raise ValueError(f"no word for operands above {len(WORDS) - 1}")
        return f"What is {WORDS[a]} {word} {WORDS[b]}?"
    return f"What is {a} {symbol} {b}?"


def with_choices(text: str, answer: int, rng: random.Random) -> str:
    """The question followed by its answer and a distractor 1 or 2 away (above the answer when below would be
    negative), in an order drawn from `rng`."""
    offset = rng.choice((-2, -1, 1, 2))
    distractor = answer + offset if answer + offset >= 0 else answer - offset
    first, second = (answer, distractor) if rng.random() < 0.5 else (distractor, answer)
    return f"{text} Is it {first} or {second}?"


def _rows(split_facts, rng: random.Random, both_orders: bool, choices: random.Random | None = None) -> list[dict]:
    rows = []
    for a, op, b in split_facts:
        orders = [(a, b), (b, a)] if both_orders and op != "-" and a != b else [(a, b)]
        if not both_orders and op != "-" and rng.random() < 0.5:
            orders = [(b, a)]
        for x, y in orders:
            for words in (False, True) if both_orders else (rng.random() < 0.5,):
                text, answer = question(x, op, y, words), solve(x, op, y)
                text = with_choices(text, answer, choices) if choices is not None else text
                rows.append({"question": text, "answer": str(answer)})
    rng.shuffle(rows)
    return rows


def split_facts_of(seed: int = 0, n_test: int = 320, n_validation: int = 120, max_operand: int = 20) -> dict:
    """{"test", "validation", "train"} lists of disjoint facts (a, op, b), the pool shuffled by `seed`."""
    pool = facts(max_operand)
    rng = random.Random(seed)
    rng.shuffle(pool)
    if n_test + n_validation >= len(pool):
        raise ValueError(f"n_test + n_validation must be below the {len(pool)} facts with max_operand={max_operand}")
    return {
        "test": pool[:n_test],
        "validation": pool[n_test : n_test + n_validation],
        "train": pool[n_test + n_validation :],
    }


def make_splits(
    seed: int = 0, n_test: int = 320, n_validation: int = 120, max_operand: int = 20, two_choices: bool = False
) -> dict:
    """{"train", "validation", "test"} lists of {"id", "question", "answer"} rows over disjoint facts. Validation and
    test ask each fact once (one order, one wording drawn at random); train asks its facts in both orders and both
    wordings. `two_choices` adds the choices from their own random stream, so the facts, orders and wordings stay
    those of the plain splits."""
    splits = {}
    for name, split_facts in split_facts_of(seed, n_test, n_validation, max_operand).items():
        choices = random.Random(f"{seed}-{name}-choices") if two_choices else None
        rows = _rows(split_facts, random.Random(f"{seed}-{name}"), both_orders=name == "train", choices=choices)
        splits[name] = [{"id": f"{name}-{i}", **row} for i, row in enumerate(rows)]
    return splits


def write_splits(output_dir: str | Path, **kwargs) -> dict[str, Path]:
    """The splits as `train.jsonl`, `validation.jsonl` and `test.jsonl` in output_dir."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in make_splits(**kwargs).items():
        paths[name] = output_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths
