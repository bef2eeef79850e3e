"""How often a wrong attempt gives the answer of one of the prompt's worked examples.

With a few-shot plain-text prompt, the correction turn ends in a fresh "Answer:" slot after the worked examples; a
base model can fill it with an example's answer instead of revising its own. This counts, per attempt, the wrong
attempts whose graded number (the `numeric` reward's last number) is one of the worked examples' answers:

    python -m experiments.copies recipes/reproduce/gemma3_270m_plain.yaml docs/results/gemma3_270m_plain
"""

import json
import re
import sys
from pathlib import Path

from score_trl.rewards import last_number


def worked_answers(template: str) -> set[str]:
    """The answers of the worked examples in a plain prompt template: every "Answer: X" line before "{question}"."""
    examples = template.split("{question}")[0]
    return {last_number(answer) for answer in re.findall(r"Answer:[ \t]*(\S+)[ \t]*\n", examples)} - {None}


def copied_answers(records: list[dict], answers: set[str]) -> dict[str, int]:
    """Per attempt t, the wrong attempts (reward 0) whose last number is in `answers`; `problems` is the count."""
    counts = {"problems": len(records)}
    for t in (1, 2):
        counts[f"attempt_{t}"] = sum(
            1 for r in records if r[f"reward_{t}"] == 0 and last_number(r[f"attempt_{t}"]) in answers
        )
    return counts


def main(recipe: str, results_dir: str) -> dict:
    import yaml

    answers = worked_answers(yaml.safe_load(Path(recipe).read_text())["plain_prompt_template"])
    root = Path(results_dir)
    table = {"worked_answers": sorted(answers, key=float), "arms": {}}
    for path in [root / "base" / "records.jsonl", *sorted(root.glob("seed[0-9]*/*/records.jsonl"))]:
        if path.is_file():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            table["arms"][str(path.parent.relative_to(root))] = copied_answers(records, answers)
    (root / "copies.json").write_text(json.dumps(table, indent=1) + "\n")
    return table


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3]), indent=1))
