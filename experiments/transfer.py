"""The reproduction's transfer set: the test split's arithmetic facts asked in phrasings the generator
(`experiments.arithmetic`, always "What is A op B?") never uses: other verbs, word orders, symbols and small word
problems. A self-correction skill that holds only for the training template scores well on the test split and not
here.

The facts are the test split's (disjoint from training), so the only thing that changes is how the question is put.
Each fact gets one phrasing, drawn with a seed from the templates below (written for this set, not derived from the
generator's).
"""

import json
import random
from pathlib import Path

from .arithmetic import WORDS, solve, split_facts_of


# {a} and {b} are the operands (digits or words, drawn per question); for "-", a >= b
TEMPLATES = {
    "+": (
        "Add {a} and {b}.",
        "Compute the sum of {a} and {b}.",
        "{a} added to {b} gives which number?",
        "Calculate {a}+{b}.",
        "Tom has {a} marbles and finds {b} more. How many marbles does he have now?",
        "Find the total when {b} is combined with {a}.",
    ),
    "-": (
        "Subtract {b} from {a}.",
        "Take {b} away from {a}. How much is left?",
        "Compute the difference {a} − {b}.",
        "How much larger is {a} than {b}?",
        "A shelf holds {a} books and {b} are borrowed. How many books remain on the shelf?",
        "{a} decreased by {b} equals which number?",
    ),
    "*": (
        "Multiply {a} by {b}.",
        "Compute the product of {a} and {b}.",
        "Calculate {a}*{b}.",
        "There are {a} boxes with {b} pens in each box. How many pens are there?",
        "{a} multiplied by {b} gives which number?",
        "Find {a} · {b}.",
    ),
}


def rephrase(a: int, op: str, b: int, rng: random.Random) -> str:
    """One question for the fact (a, op, b) in a randomly drawn template, operands as digits or as words."""
    if op != "-" and rng.random() < 0.5:
        a, b = b, a  # + and × facts are stored with a <= b
    template = rng.choice(TEMPLATES[op])
    in_words = rng.random() < 0.5 and not any(symbol in template for symbol in "+−*·")  # symbols take digits
    spell = WORDS.__getitem__ if in_words else str
    text = template.format(a=spell(a), b=spell(b))
    return text[0].upper() + text[1:]


def transfer_rows(seed: int = 0, n_test: int = 320, n_validation: int = 120, limit: int | None = None) -> list[dict]:
    """{"id", "question", "answer"} rows: the test facts of `make_splits(seed, n_test, n_validation)` rephrased, in
    the test split's fact order, the first `limit` of them."""
    test_facts = split_facts_of(seed, n_test, n_validation)["test"][:limit]
    rng = random.Random(f"{seed}-transfer")
    return [
        {"id": f"transfer-{i}", "question": rephrase(a, op, b, rng), "answer": str(solve(a, op, b))}
        for i, (a, op, b) in enumerate(test_facts)
    ]


def write_transfer(path: str | Path, **kwargs) -> Path:
    """The transfer rows as JSONL at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in transfer_rows(**kwargs)))
    return path
