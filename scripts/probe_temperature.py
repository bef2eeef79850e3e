"""Choose the training sampling temperature on the validation split (never the test split): for each temperature,
sample `--samples` first attempts per validation question and report the sampled accuracy and the share of questions
whose samples disagree (the groups RLOO and SCoRe can learn from; a group that is all right or all wrong has zero
advantage). Writes a JSON file.

    python scripts/probe_temperature.py recipes/reproduce/smollm2_cpu.yaml --temperatures 1.0 0.7 --out probe.json
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, set_seed

from score_trl.cli.reproduce import load, parse_args
from score_trl.generation import TransformersGenerator
from score_trl.rewards import numeric_reward


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default="probe_temperature.json")
    own, rest = parser.parse_known_args()
    args = parse_args(rest)
    path, tokenizer, data = load(args)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = list(data["validation"])
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=False) for r in rows]
    results = {}
    for temperature in own.temperatures:
        set_seed(args.seeds[0])
        generate = TransformersGenerator(
            model, tokenizer, args.max_completion_length, do_sample=True, temperature=temperature
        )
        per_sample = []
        for _ in range(own.samples):
            ids = [c for i in range(0, len(prompts), 40) for c in generate(prompts[i : i + 40])]
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in texts]
            per_sample.append(numeric_reward(completions, answer=[r["answer"] for r in rows]))
        groups = list(zip(*per_sample, strict=True))
        results[temperature] = {
            "sampled_accuracy": sum(map(sum, groups)) / (own.samples * len(groups)),
            "mixed_groups": sum(0 < sum(g) < own.samples for g in groups) / len(groups),
            "questions": len(groups),
        }
        print(temperature, results[temperature], flush=True)
    with open(own.out, "w") as f:
        json.dump({"split": "validation", "samples": own.samples, "results": results}, f, indent=2)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
