"""How often a wrong attempt gives the answer of one of the prompt's worked examples.

With a few-shot plain-text prompt, the correction turn ends in a fresh "Answer:" slot after the worked examples; a
base model can fill it with an example's answer instead of revising its own. This counts, per attempt, the wrong
attempts whose graded number (the `numeric` reward's last number, `experiments.pooled.GRADED_ANSWER`) is one of the
worked examples' answers:

    python -m experiments.copies recipes/reproduce/gemma3_270m_plain.yaml docs/results/gemma3_270m_plain
"""

import argparse
import json
import re
from pathlib import Path

from score_trl.config import CORRECT_THRESHOLD
from score_trl.evaluation import read_records

from .pooled import GRADED_ANSWER


def worked_answers(template: str) -> set[str]:
    """The answers of the worked examples in a plain prompt template: every "Answer: X" line before "{question}"."""
    examples = template.split("{question}")[0]
    return {GRADED_ANSWER(answer) for answer in re.findall(r"Answer:[ \t]*(\S+)[ \t]*\n", examples)} - {None}


def copied_answers(records: list[dict], answers: set[str]) -> dict[str, int]:
    """Per attempt t, the wrong attempts (reward under `CORRECT_THRESHOLD`, as the reproduction's tables count them)
    whose graded number (`experiments.pooled.GRADED_ANSWER`) is in `answers`; `problems` is the count."""
    counts = {"problems": len(records)}
    for t in (1, 2):
        counts[f"attempt_{t}"] = sum(
            1
            for r in records
            if not r[f"reward_{t}"] >= CORRECT_THRESHOLD and GRADED_ANSWER(r[f"attempt_{t}"]) in answers
        )
    return counts


def main(recipe: str, results_dir: str) -> dict:
    import yaml

    template = yaml.safe_load(Path(recipe).read_text()).get("plain_prompt_template")
    if not template:
        raise ValueError(f"{recipe} has no plain_prompt_template: give the recipe of a plain-text prompt run.")
    answers = worked_answers(template)
    root = Path(results_dir)
    table = {"worked_answers": sorted(answers, key=float), "arms": {}}
    for path in [root / "base" / "records.jsonl", *sorted(root.glob("seed[0-9]*/*/records.jsonl"))]:
        if path.is_file():
            records = read_records(path, repair=False)
            table["arms"][str(path.parent.relative_to(root))] = copied_answers(records, answers)
    (root / "copies.json").write_text(json.dumps(table, indent=1) + "\n")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="the run's recipe (its plain_prompt_template holds the worked examples)")
    parser.add_argument("results_dir", help="the run's results folder (base/ and seedN/ARM/ with records.jsonl)")
    args = parser.parse_args()
    print(json.dumps(main(args.recipe, args.results_dir), indent=1))
