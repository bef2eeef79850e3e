"""The GPU check: one command that, on a stock CUDA PyTorch image, measures the product's recipe and its generation
backends in minutes, each stage under its own time limit, writing its results as soon as each stage ends.

    make gpu-bundle                                     # on the CPU side, with the package index: .gpu_bundle/
    python3 scripts/gpu_check.py --output $OUT          # on the GPU machine (carry .gpu_bundle)
    python3 scripts/gpu_check.py --cpu --output check   # CPU mode: tiny Gemma 2, no bitsandbytes (the test suite's)

Stages, in order (each skipped once the time budget is spent):
- setup: install the bundle's wheels into a private folder (GPU mode), decompress the tokenizer;
- model: gemma-2-2b from its published configuration with random weights (`score_trl.cli.benchmark.GEMMA2_2B`) and
  Gemma 3's tokenizer; in CPU mode the smallest configuration of the same architecture;
- recipe: two optimizer steps of `recipes/gemma2b.yaml` through `accelerate launch` (step 1 in Stage I, step 2 in
  Stage II) on the bundle's GSM8K rows: step times, the logged metrics, peak memory (torch and nvidia-smi);
- benchmark: `score-benchmark` at the recipe's size (32 rows, 512 + 512 tokens, nf4, LoRA r=32): SCoRe and RLOO,
  per-phase times, tokens/s, ms per decode step, the SCoRe/RLOO ratio;
- backend_<name>: the SCoRe arm alone with each generation backend (`score_trl.cli.benchmark.BACKENDS`), 128 tokens
  per attempt; CUDA-only backends are skipped in CPU mode;
- zero2: last, if time is left, one step through `recipes/accelerate_configs/zero2.yaml` (DeepSpeed from its source
  package, ops built just in time).

Writes `gpu_check.json` (every figure, versions, GPU name, each stage's status and time) and `gpu_check.md` (tables,
the issue's goals against what was measured) after every stage, and `gpu_check.log` (each stage's output tail). This
process uses the standard library only: every stage runs in its own process, so a stage that crashes or hangs is
recorded and the next one runs.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/score_trl_site")
BACKEND_STAGES = ["generate", "static", "static_compiled", "continuous_batching", "continuous_batching_cuda_graphs"]
BACKEND_STAGES += ["merged"]
CUDA_ONLY = {
    "static_compiled": "compiled decoding runs on CUDA only",
    "continuous_batching_cuda_graphs": "CUDA graphs need CUDA",
}
# Goals of the GPU issue, on one H200-class GPU: (label, how to read the measured value, goal, unit)
GOALS = [
    ("recipe step (median of its 2 steps)", "recipe_step_s", 20.0, "s"),
    ("decoding at batch 32 (benchmark, SCoRe)", "decode_ms", 15.0, "ms per step"),
    ("SCoRe/RLOO step time at the recipe's size", "ratio", 1.10, "×"),
    ("peak GPU memory with nf4 (recipe, max_memory_allocated)", "recipe_peak_gib", 16.0, "GiB"),
]


class Check:
    """The stages' results and the files they are written to."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget
        self.result = {"mode": "cpu" if args.cpu else "gpu", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "command": " ".join(sys.argv), "commit": git_commit(), "budget_s": args.budget,
                       "stages": {}}  # fmt: skip
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        self.env["PYTHONPATH"] = os.pathsep.join(
            [*([str(SITE)] if not args.cpu else []), str(ROOT), self.env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        (self.out / "gpu_check.log").write_text("")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: list[str], limit: float, **env) -> dict:
        """Run one stage's command under `min(limit, time left)`; its status, time, output tail and GPU memory peak
        (the caller records it)."""
        if self.left() < 10:
            return {"status": "skipped", "why": "time budget spent"}
        timeout = min(limit, self.left())
        monitor = GpuMemory() if not self.args.cpu else None
        start = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env={**self.env, **env}, capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            status = f"timed out after {timeout:.0f} s"
            output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        seconds = round(time.monotonic() - start, 1)
        entry = {"status": status, "seconds": seconds, "command": " ".join(map(str, command))}
        if monitor is not None:
            entry["nvidia_smi_peak_mib"] = monitor.stop()
        with (self.out / "gpu_check.log").open("a") as log:
            log.write(f"===== {name}: {status} in {seconds} s\n$ {entry['command']}\n{output[-6000:]}\n")
        entry["output"] = output
        return entry

    def record(self, name: str, entry: dict) -> dict:
        entry.pop("output", None)
        self.result["stages"][name] = entry
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1))
        (self.out / "gpu_check.md").write_text(markdown(self.result))
        print(f"[gpu_check] {name}: {entry['status']}", flush=True)
        return entry


def git_commit() -> str | None:
    """The checkout's commit, with "+dirty" for uncommitted changes; None where the tree travelled without .git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else None


class GpuMemory:
    """The peak of nvidia-smi's memory.used while a stage runs, sampled twice a second."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.5):
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout  # fmt: skip
                self.peak = max(self.peak, *(int(v) for v in used.split()))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def setup(check: Check) -> dict:
    """GPU mode: the bundle's wheels into SITE. Both modes: the tokenizer folder."""
    bundle = Path(check.args.bundle)
    entry = {"status": "ok"}
    if not check.args.cpu:
        wheels = sorted(str(p) for p in (bundle / "wheels").glob("*.whl"))
        if not wheels:
            return check.record("setup", {"status": f"failed: no wheels in {bundle}/wheels (run `make gpu-bundle`)"})
        done = check.run("setup", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                   "--no-compile", "--upgrade", "--target", str(SITE), *wheels], 300)  # fmt: skip
        entry = {k: v for k, v in done.items() if k != "output"}
    tokenizer = Path(check.args.tokenizer) if check.args.tokenizer else bundle / "tokenizer"
    target = check.work / "tokenizer"
    shutil.copytree(tokenizer, target, dirs_exist_ok=True)
    if (target / "tokenizer.json.gz").is_file():
        with gzip.open(target / "tokenizer.json.gz") as f, (target / "tokenizer.json").open("wb") as out:
            shutil.copyfileobj(f, out)
    entry["versions"] = versions(check)
    return check.record("setup", entry)


def versions(check: Check) -> dict:
    code = (
        "import importlib.metadata as m, json, torch\n"
        "names = ['torch', 'transformers', 'trl', 'peft', 'accelerate', 'datasets', 'bitsandbytes', 'deepspeed']\n"
        "found = {}\n"
        "for n in names:\n"
        "    try: found[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: found[n] = None\n"
        "found['cuda'] = torch.version.cuda\n"
        "found['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None\n"
        "print(json.dumps(found))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=check.env, capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-500:]}


def build_model(out: str, tokenizer: str, tiny: bool):
    """(Run in its own process.) gemma-2-2b's architecture with random weights and the given tokenizer."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from score_trl.cli.benchmark import GEMMA2_2B, GEMMA2_TINY

    tok = AutoTokenizer.from_pretrained(tokenizer)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    eos = [tok.eos_token_id] + ([end_of_turn] if end_of_turn != tok.unk_token_id else [])
    config = Gemma2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=eos, **(GEMMA2_TINY if tiny else GEMMA2_2B))  # fmt: skip
    torch.manual_seed(0)
    cuda = torch.cuda.is_available() and not tiny
    with torch.device("cuda" if cuda else "cpu"):
        model = Gemma2ForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
    tok.save_pretrained(out)


def recipe_command(check: Check, model: Path, output: Path, extra: list[str], accelerate: list[str]) -> list[str]:
    cpu = check.args.cpu
    overrides = ["--model_name_or_path", str(model), "--dataset_name", check.args.data, "--max_steps", "2",
                 "--stage_one_steps", "1", "--eval_strategy", "no", "--report_to", "none", "--save_strategy", "steps",
                 "--save_steps", "1", "--output_dir", str(output), "--logging_steps", "1"]  # fmt: skip
    if cpu:  # the recipe's shape on the tiny model: no bitsandbytes, no bf16, small batches and lengths
        overrides += ["--load_in_4bit", "false", "--use_bnb_nested_quant", "false", "--bf16", "false", "--use_cpu",
                      "true", "--gradient_checkpointing", "false", "--per_device_train_batch_size", "4",
                      "--num_generations", "2", "--gradient_accumulation_steps", "1", "--max_completion_length", "8",
                      "--dtype", "float32"]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", *accelerate]
    return [*launch, "scripts/train_score.py", "recipes/gemma2b.yaml", *overrides, *extra]


def recipe(check: Check, model: Path) -> dict:
    output = check.work / "recipe"
    accelerate = ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    accelerate += ["--mixed_precision", "no"] if check.args.cpu else [
        "--config_file", "recipes/accelerate_configs/single_gpu.yaml"]  # fmt: skip
    entry = check.run("recipe", recipe_command(check, model, output, [], accelerate), check.args.recipe_limit)
    history = last_log_history(output)
    steps = [h for h in history if "loss" in h]
    entry["steps"] = [{k: h.get(k) for k in ("step", "stage", "step_time", "loss", "reward", "turn1/reward",
                                            "turn2/reward", "kl", "num_tokens")} for h in steps]  # fmt: skip
    if steps:
        times = sorted(h["step_time"] for h in steps if "step_time" in h)
        entry["recipe_step_s"] = times[len(times) // 2] if times else None
    peak = [line for line in entry.get("output", "").splitlines() if line.startswith("Peak GPU memory:")]
    entry["recipe_peak_gib"] = float(peak[-1].split()[3]) if peak else None
    return check.record("recipe", entry)


def last_log_history(output: Path) -> list[dict]:
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints or not (checkpoints[-1] / "trainer_state.json").is_file():
        return []
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]


def benchmark_command(check: Check, model: Path, out_json: Path, extra: list[str]) -> list[str]:
    if check.args.cpu:
        size = ["--rows", "4", "--num_generations", "2", "--tokens", "4", "--lora_r", "4", "--cpu"]
    else:
        size = ["--rows", "32", "--num_generations", "4", "--lora_r", "32", "--load_in_4bit"]
        size += ["--gradient_checkpointing"]  # as the recipe
    return [sys.executable, "-m", "score_trl.cli.benchmark", "--model", str(model), "--steps", "1", "--warmup", "0",
            *size, "--output_json", str(out_json), *extra]  # fmt: skip


def benchmark(check: Check, model: Path) -> dict:
    out_json = check.work / "benchmark.json"
    tokens = [] if check.args.cpu else ["--tokens", "512"]
    entry = check.run("benchmark", benchmark_command(check, model, out_json, tokens), check.args.benchmark_limit)
    if out_json.is_file():
        figures = json.loads(out_json.read_text())
        entry |= {"arms": figures["arms"], "phases": figures["phases"], "ratios": figures["ratios"]}
        entry["ratio"] = figures["ratios"].get("SCoRe/RLOO")
        entry["decode_ms"] = figures["arms"].get("SCoRe", {}).get("decode_ms_per_step")
    return check.record("benchmark", entry)


def backend(check: Check, model: Path, name: str) -> dict:
    stage = f"backend_{name}"
    if check.args.cpu and name in CUDA_ONLY:
        return check.record(stage, {"status": "skipped", "why": f"{CUDA_ONLY[name]} (CPU mode)"})
    out_json = check.work / f"{stage}.json"
    tokens = [] if check.args.cpu else ["--tokens", "128"]
    extra = [*tokens, "--arms", "SCoRe", "--backends", name]
    entry = check.run(stage, benchmark_command(check, model, out_json, extra), check.args.backend_limit)
    if out_json.is_file():
        arm = json.loads(out_json.read_text())["arms"]["SCoRe"]
        entry |= {k: arm.get(k) for k in ("step_median_s", "tokens_per_s", "decode_ms_per_step", "peak_memory_gib")}
    return check.record(stage, entry)


def zero2(check: Check, model: Path) -> dict:
    if check.args.cpu:
        return check.record("zero2", {"status": "skipped", "why": "DeepSpeed needs CUDA (CPU mode)"})
    sdist = sorted(Path(check.args.bundle).glob("sdist/deepspeed-*.tar.gz"))
    if not sdist:
        return check.record("zero2", {"status": "skipped", "why": "no DeepSpeed source package in the bundle"})
    install = check.run("zero2_install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                          "--no-build-isolation", "--target", str(SITE), str(sdist[0])],
                        check.args.zero2_limit, DS_BUILD_OPS="0")  # fmt: skip
    if install["status"] != "ok":
        return check.record("zero2", {k: v for k, v in install.items() if k != "output"} | {"stage": "install"})
    accelerate = ["--config_file", "recipes/accelerate_configs/zero2.yaml", "--num_processes", "1"]
    command = recipe_command(check, model, check.work / "zero2", ["--max_steps", "1", "--stage_one_steps", "0"],
                             accelerate)  # fmt: skip
    entry = check.run("zero2", command, check.args.zero2_limit)
    entry["steps"] = [h.get("step_time") for h in last_log_history(check.work / "zero2") if "loss" in h]
    return check.record("zero2", entry)


def markdown(result: dict) -> str:
    stages = result["stages"]
    versions = stages.get("setup", {}).get("versions", {})
    lines = [
        f"# GPU check ({result['mode']} mode), {result['date']}",
        "",
        f"GPU: {versions.get('gpu') or 'none'}; CUDA {versions.get('cuda')}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("gpu", "cuda") and v),
        f"Command: `{result['command']}`; commit {result.get('commit') or 'unknown'}",
        "",
        "| stage | status | seconds | figures |",
        "|---|---|---|---|",
    ]
    for name, entry in stages.items():
        figures = {k: v for k, v in entry.items() if isinstance(v, int | float) and k != "seconds"}
        cells = ", ".join(f"{k} {v:.3g}" for k, v in figures.items())
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '–')} | {cells or entry.get('why', '')} |")
    measured = {
        "recipe_step_s": stages.get("recipe", {}).get("recipe_step_s"),
        "recipe_peak_gib": stages.get("recipe", {}).get("recipe_peak_gib"),
        "decode_ms": stages.get("benchmark", {}).get("decode_ms"),
        "ratio": stages.get("benchmark", {}).get("ratio"),
    }
    lines += ["", "| goal | measured | goal | met |", "|---|---|---|---|"]
    for label, key, goal, unit in GOALS:
        value = measured[key]
        shown = "missing" if value is None else f"{value:.3g} {unit}"
        met = "–" if value is None or result["mode"] == "cpu" else ("yes" if value <= goal else "no")
        lines.append(f"| {label} | {shown} | ≤ {goal:g} {unit} | {met} |")
    fastest = sorted(
        (entry["step_median_s"], name.removeprefix("backend_"))
        for name, entry in stages.items()
        if name.startswith("backend_") and entry.get("step_median_s")
    )
    if fastest:
        lines += ["", f"Fastest generation backend here: {fastest[0][1]} ({fastest[0][0]:.3g} s per SCoRe step)."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="gpu_check", help="Folder for gpu_check.json, .md and .log.")
    parser.add_argument("--work", default="/tmp/score_trl_gpu_check", help="Scratch folder (model, checkpoints).")
    parser.add_argument("--bundle", default=str(ROOT / ".gpu_bundle"), help="`make gpu-bundle`'s folder.")
    parser.add_argument("--cpu", action="store_true", help="CPU mode: tiny Gemma 2, no bitsandbytes, no DeepSpeed.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the bundle's).")
    parser.add_argument("--data", default=None, help="GSM8K-format JSONL (default: the bundle's rows).")
    parser.add_argument("--budget", type=float, default=480, help="Seconds for every stage together.")
    parser.add_argument("--recipe_limit", type=float, default=150, help="Seconds for the recipe's two steps.")
    parser.add_argument("--benchmark_limit", type=float, default=120, help="Seconds for the benchmark.")
    parser.add_argument("--backend_limit", type=float, default=45, help="Seconds per generation backend.")
    parser.add_argument(
        "--zero2_limit", type=float, default=120, help="Seconds for DeepSpeed's install, and its step."
    )
    parser.add_argument("--_build_model", nargs=2, metavar=("OUT", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build_model:
        return build_model(*args._build_model, tiny=args.cpu)
    args.data = args.data or str(Path(args.bundle) / "data" / "gsm8k_train.jsonl")
    check = Check(args)
    if setup(check)["status"] != "ok":
        return
    model = check.work / "model"
    build = [sys.executable, __file__, "--_build_model", str(model), str(check.work / "tokenizer")]
    built = check.record("model", check.run("model", build + (["--cpu"] if args.cpu else []), 180))
    if built["status"] != "ok":
        return
    recipe(check, model)
    benchmark(check, model)
    for name in BACKEND_STAGES:
        backend(check, model, name)
    zero2(check, model)


if __name__ == "__main__":
    main()
