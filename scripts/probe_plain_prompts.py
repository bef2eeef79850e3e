"""Choose a plain-text few-shot prompt for a base model on the validation split (never the test split): for each
candidate template (worked examples from the train split, then the question), the greedy first-attempt accuracy on
every validation question, each attempt cut at the first newline as training would cut it (`stop_strings`). Writes a
JSON file with every template's accuracy, the best one, whether it reaches `--threshold` (below it the model is not
worth a training run at this budget), and the provenance (commit, versions, command, date, hardware, wall time).

    python scripts/probe_plain_prompts.py recipes/reproduce/gemma3_270m_cpu.yaml --shots 4 8 \
        --out docs/results/gemma3_270m/validation/plain_prompts.json
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's experiments/, not installed
from experiments.reproduce import hardware, load, parse_args  # noqa: E402
from score_trl.cli.common import provenance  # noqa: E402
from score_trl.generation import TransformersGenerator  # noqa: E402
from score_trl.models import load_for_generation  # noqa: E402
from score_trl.rewards import numeric_reward  # noqa: E402


STYLES = {"question": ("Question: {q}\nAnswer:", " {a}"), "qa": ("Q: {q}\nA:", " {a}")}
STOP = ["\n"]  # one answer per line: the next line would start the next question


def template(examples: list[dict], style: str) -> str:
    """Worked examples, then the question: `style`'s question line and answer, blank lines between."""
    ask, answer = STYLES[style]
    shots = "".join(ask.format(q=row["question"]) + answer.format(a=row["answer"]) + "\n\n" for row in examples)
    return shots + ask.replace("{q}", "{question}")


def accuracy(model, tokenizer, rows, text: str, max_new_tokens: int) -> tuple[float, list[str]]:
    """Greedy first-attempt accuracy of `text` on `rows`, and the first completions (to see what the model does)."""
    generate = TransformersGenerator(model, tokenizer, max_new_tokens, stop_strings=STOP)
    prompts = tokenizer(text=[text.format(question=r["question"]) for r in rows])["input_ids"]
    ids = [c for i in range(0, len(prompts), 40) for c in generate(prompts[i : i + 40])]
    completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
    rewards = numeric_reward(completions, answer=[r["answer"] for r in rows])
    return sum(rewards) / len(rewards), completions[:5]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--styles", nargs="+", default=list(STYLES))
    parser.add_argument("--threshold", type=float, default=0.15)
    parser.add_argument("--out", default="plain_prompts.json")
    own, rest = parser.parse_known_args()
    setup = parse_args(rest)
    started, start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    path, tokenizer, data = load(setup)
    model = load_for_generation(path, cpu=True)
    train, rows = list(data["train"]), list(data["validation"])
    results = []
    for shots in own.shots:
        for style in own.styles:
            text = template(train[:shots], style)
            value, samples = accuracy(model, tokenizer, rows, text, setup.training.max_completion_length)
            results.append({"shots": shots, "style": style, "greedy_accuracy": value, "template": text,
                            "first_completions": samples})  # fmt: skip
            print(f"{shots} shots, {style}: {value:.3f}", flush=True)
    best = max(results, key=lambda r: r["greedy_accuracy"])
    record = {
        "split": "validation",
        "questions": len(rows),
        "model": setup.script.gguf_file or setup.model.model_name_or_path,
        "examples_from": "train split (its first rows)",
        "stop_strings": STOP,
        "max_new_tokens": setup.training.max_completion_length,
        "results": results,
        "best": {k: best[k] for k in ("shots", "style", "greedy_accuracy", "template")},
        "threshold": own.threshold,
        "reaches_threshold": best["greedy_accuracy"] >= own.threshold,
        "date": started.isoformat(timespec="seconds"),
        "hardware": hardware(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        **provenance(),
    }
    Path(own.out).parent.mkdir(parents=True, exist_ok=True)
    Path(own.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record["best"], indent=2))


if __name__ == "__main__":
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    main()
