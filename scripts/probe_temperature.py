"""Choose the training sampling temperature on the validation split (never the test split): for each temperature,
sample `--samples` first attempts per validation question and report the sampled accuracy and the share of questions
whose samples disagree (the groups RLOO and SCoRe can learn from; a group that is all right or all wrong has zero
advantage). Also the greedy first-attempt accuracy (the base model's). Writes a JSON file with the provenance
(commit, versions, command, date, hardware, wall time, peak RSS).

    python scripts/probe_temperature.py recipes/reproduce/smollm2_cpu.yaml --temperatures 1.0 0.7 --out probe.json
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from transformers import set_seed


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's experiments/, not installed
from experiments.reproduce import hardware, load, parse_args  # noqa: E402
from score_trl.cli.common import provenance  # noqa: E402
from score_trl.generation import TransformersGenerator  # noqa: E402
from score_trl.models import load_for_generation  # noqa: E402
from score_trl.rewards import numeric_reward  # noqa: E402
from score_trl.scoring import as_completion  # noqa: E402


def first_attempts(model, tokenizer, prompts, rows, max_new_tokens, **sampling) -> list[float]:
    """numeric_reward of one first attempt per prompt, generated 40 prompts at a time."""
    generate = TransformersGenerator(model, tokenizer, max_new_tokens, **sampling)
    ids = [c for i in range(0, len(prompts), 40) for c in generate(prompts[i : i + 40])]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    completions = [as_completion(t) for t in texts]
    return numeric_reward(completions, answer=[r["answer"] for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default="probe_temperature.json")
    own, rest = parser.parse_known_args()
    setup = parse_args(rest)
    args, tokens = setup.args, setup.training.max_completion_length
    started, start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    path, tokenizer, data = load(setup)
    model = load_for_generation(path, cpu=True)
    rows = list(data["validation"])
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=False) for r in rows]
    greedy = first_attempts(model, tokenizer, prompts, rows, tokens, do_sample=False)
    print("greedy accuracy", sum(greedy) / len(greedy), flush=True)
    results = {}
    for temperature in own.temperatures:
        set_seed(args.seeds[0])
        per_sample = [
            first_attempts(model, tokenizer, prompts, rows, tokens, do_sample=True, temperature=temperature)
            for _ in range(own.samples)
        ]
        groups = list(zip(*per_sample, strict=True))
        results[temperature] = {
            "sampled_accuracy": sum(map(sum, groups)) / (own.samples * len(groups)),
            "mixed_groups": sum(0 < sum(g) < own.samples for g in groups) / len(groups),
            "questions": len(groups),
        }
        print(temperature, results[temperature], flush=True)
    Path(own.out).parent.mkdir(parents=True, exist_ok=True)
    with open(own.out, "w") as f:
        record = {
            "split": "validation",
            "model": setup.script.gguf_file or setup.model.model_name_or_path,
            "chat_template": setup.script.chat_template,
            "samples": own.samples,
            "max_new_tokens": tokens,
            "greedy_accuracy": sum(greedy) / len(greedy),
            "results": results,
            "date": started.isoformat(timespec="seconds"),
            "hardware": hardware(),
            "wall_seconds": round(time.perf_counter() - start, 1),
            **provenance(),
        }
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
