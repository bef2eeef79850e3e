# Is the re-converted Gemma 3 270M the model seed 0 and the base arm ran with? Greedy base evaluation of the first
# 40 test problems with the current conversion, against the committed base records (written 2026-11-29 07:07 UTC).
# Run from a worktree of 41c9dc4 with PYTHONPATH set to it; paths are this machine's.
import json
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from score_trl.cli.reproduce import ReproduceArguments, evaluate_into, load
from score_trl.generation import TransformersGenerator
from score_trl.rewards import numeric_reward


torch.set_num_threads(1)
cfg = yaml.safe_load(open("/work/main/recipes/reproduce/gemma3_270m_cpu.yaml"))
cfg.update(work_dir="/work/repro/outputs/reproduce_gemma3_270m", output_dir="/tmp/basecheck_out")
args = ReproduceArguments(**cfg)
path, tokenizer, data = load(args)
print("model", path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
gen = TransformersGenerator(model, tokenizer, max_new_tokens=args.eval_max_new_tokens)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
out = Path("/work/main/docs/results/gemma3_270m/logs/reconversion_check")
if (out / "records.jsonl").exists():
    (out / "records.jsonl").unlink()
evaluate_into(out, gen, tokenizer, data["test"].select(range(n)), numeric_reward, args, "base")
new = [json.loads(line) for line in open(out / "records.jsonl")]
old = [json.loads(line) for line in open("/work/main/docs/results/gemma3_270m/base/records.jsonl")][:n]
same = sum((a["attempt_1"], a["attempt_2"]) == (b["attempt_1"], b["attempt_2"]) for a, b in zip(new, old, strict=True))
print(f"identical records: {same} of {len(new)} (old {len(old)})")
