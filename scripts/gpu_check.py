"""The GPU check: one command that, on a stock CUDA PyTorch image, measures the product's recipe and its generation
backends within one 8-minute device call, each stage under its own time limit, writing its results as they come.

    make gpu-bundle                                     # on the CPU side, with the package index: .gpu_bundle/
    python3 scripts/gpu_check.py --output $OUT          # on the GPU machine (carry .gpu_bundle)
    python3 scripts/gpu_check.py --cpu --output check   # CPU mode: tiny Gemma 2, no bitsandbytes (the test suite's)

Stages, in order of value (`timeline()` gives each one's expected seconds and limit, derived from what was measured
by hand on an H200; the limits of the required stages add up to no more than the budget):
- setup (required): the bundle's pinned wheels into a private folder, then every package the later stages need is
  imported and its version and location recorded: a missing or broken package fails here in seconds, by name;
- model (required): gemma-2-2b from its published configuration with random weights and Gemma 3's tokenizer;
- recipe_step (required): one optimizer step of `recipes/gemma2b.yaml` at its full size, in Stage II, through
  `accelerate launch`; step time, torch's and nvidia-smi's peak are written as soon as the step is logged;
- backend_<name>: ms per decode step at batch 32 x 128 tokens per attempt (the SCoRe arm of
  `experiments/benchmark.py`), most promising first; continuous batching with and without CUDA graphs are required;
- ratio_128 (required): SCoRe against RLOO at 128 tokens per attempt, padded `generate`, so its SCoRe arm is also that
  backend's decode figure;
- only with budget left: static cache + compile, `merged`, the recipe's second step (resumed from the first one's
  checkpoint), the ratio at 512 tokens per attempt, one ZeRO-2 step.

Every stage runs in its own process group. At its limit the whole group (and any descendant that left it) gets
SIGTERM, then SIGKILL, and the check waits until none of its processes is left and the GPU's memory is back to what
it was before the next stage starts. `gpu_check.json` and `gpu_check.md` are rewritten after every stage and whenever a
running stage reports a figure; `gpu_check.log` holds each stage's output tail. This process uses the standard library
only.
"""

import argparse
import gzip
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/score_trl_site")

# Measured by hand on an H200 with this recipe (random-weight gemma-2-2b, nf4 + LoRA r=32; the GPU issue, 2026-11)
LOAD_S = 30.0  # process start, imports, loading and quantizing the model
RECIPE_STEP_S = 95.0  # the first optimizer step at the recipe's size (94.8 s; 32 rows, 512 + 512 tokens)
DECODE_S = 0.095  # one decode step at batch 32 (70-95 ms): the slowest seen
TRAIN_SHARE = 0.13  # of the recipe's step, what is not generation (87-91% was): forward, backward, reference
# Estimated, not measured on a GPU: installing the bundle and importing everything (on the 2-core CPU machine the
# install took 2.0 s and the imports 14.2-16.1 s; bitsandbytes and CUDA's start come on top), and building the random
# model (imports, initialisation, writing 5.2 GB of bf16 weights)
SETUP_S = 25.0
MODEL_S = 25.0
SECOND_LOAD_S = 15.0  # a second model in the same process: no imports, no CUDA start
DEEPSPEED_INSTALL_S = 60.0  # DeepSpeed from its source package, ops not built
MARGIN = 1.2  # limit = expected x MARGIN, rounded up

BACKENDS = ["continuous_batching_cuda_graphs", "continuous_batching", "static_compiled", "merged"]
REQUIRED_BACKENDS = {"continuous_batching_cuda_graphs", "continuous_batching"}
CUDA_ONLY = {
    "static_compiled": "compiled decoding runs on CUDA only",
    "continuous_batching_cuda_graphs": "CUDA graphs need CUDA",
}
# Goals of the GPU issue, on one H200-class GPU: (label, key in `measured()`, goal, unit)
GOALS = [
    ("recipe step (median of the steps measured)", "recipe_step_s", 20.0, "s"),
    ("decoding at batch 32 (fastest backend)", "decode_ms", 15.0, "ms per step"),
    ("SCoRe/RLOO step time at 128 tokens per attempt", "ratio", 1.10, "×"),
    ("peak GPU memory with nf4 (recipe step, max_memory_allocated)", "recipe_peak_gib", 16.0, "GiB"),
]


def step_seconds(tokens_per_attempt: int, attempts: int = 2) -> float:
    """One SCoRe (or RLOO, same tokens) step at batch 32: every rollout runs to full length with random weights."""
    decode = attempts * tokens_per_attempt * DECODE_S
    return decode + RECIPE_STEP_S * TRAIN_SHARE * tokens_per_attempt / 512


def timeline() -> list[tuple[str, float, bool]]:
    """(stage, expected seconds on an H200, required) in the order the stages run."""
    backend = LOAD_S + step_seconds(128)
    stages = [("setup", SETUP_S, True), ("model", MODEL_S, True), ("recipe_step", LOAD_S + RECIPE_STEP_S, True)]
    stages += [(f"backend_{n}", backend, n in REQUIRED_BACKENDS) for n in BACKENDS if n in REQUIRED_BACKENDS]
    stages += [("ratio_128", LOAD_S + SECOND_LOAD_S + 2 * step_seconds(128), True)]
    stages += [(f"backend_{n}", backend, False) for n in BACKENDS if n not in REQUIRED_BACKENDS]
    stages += [
        ("recipe_step2", LOAD_S + RECIPE_STEP_S, False),
        ("ratio_512", LOAD_S + SECOND_LOAD_S + 2 * step_seconds(512), False),
        ("zero2", DEEPSPEED_INSTALL_S + LOAD_S + RECIPE_STEP_S, False),
    ]
    return stages


def limits(scale: float = 1.0) -> dict[str, float]:
    """Each stage's time limit: its expected seconds with the margin, times `scale` (CPU mode), rounded up."""
    return {name: math.ceil(expected * MARGIN) * scale for name, expected, _ in timeline()}


class Check:
    """The stages' results, the files they are written to, and the budget."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.scale = args.scale if args.scale is not None else (3.0 if args.cpu else 1.0)
        self.budget = args.budget if args.budget is not None else 480 * self.scale
        self.limits = limits(self.scale) | dict(args.limit or [])
        self.required = {name for name, _, required in timeline() if required}
        self.deadline = time.monotonic() + self.budget
        self.result = {"mode": "cpu" if args.cpu else "gpu", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "command": " ".join(sys.argv), "commit": git_commit(), "budget_s": self.budget,
                       "limits_s": self.limits, "stages": {}}  # fmt: skip
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        self.env["PYTHONPATH"] = os.pathsep.join(
            [*([str(SITE)] if not args.cpu else []), str(ROOT), self.env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        self.gpu_baseline = None if args.cpu else gpu_memory_used()
        self.running = None  # the process group of the stage under way, for the signal handler
        (self.out / "gpu_check.log").write_text("")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allowance(self, name: str) -> tuple[float, str | None]:
        """(seconds this stage may run, or 0 with the reason it is skipped). A required stage gets its limit within
        what is left; an optional one runs only when what is left, less what the required stages still to come may
        need, covers its limit."""
        later = [n for n, _, _ in timeline()]
        later = later[later.index(name) + 1 :] if name in later else []
        reserved = sum(self.limits[n] for n in later if n in self.required and n not in self.result["stages"])
        if name in self.required:
            return (min(self.limits[name], self.left()), None) if self.left() >= 5 else (0, "time budget spent")
        free = self.left() - reserved
        if free < self.limits[name]:
            return 0, f"budget left {max(free, 0):.0f} s < its limit {self.limits[name]:.0f} s"
        return self.limits[name], None

    def run(self, name: str, command: list[str], progress=None, **env) -> dict:
        """Run one stage's command in its own process group, under its allowance; its status, time and output tail.
        `progress(entry)` is called every second while it runs (to record figures as they appear)."""
        timeout, why = self.allowance(name)
        if why:
            return {"status": "skipped", "why": why}
        monitor = GpuMemory() if not self.args.cpu else None
        log_path = self.work / f"{name}.out"
        entry = {"status": "running", "command": " ".join(map(str, command)), "limit_s": round(timeout, 1)}
        start = time.monotonic()
        with log_path.open("w") as log:
            proc = subprocess.Popen(command, cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            self.running = proc
            entry["pgid"] = proc.pid
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    entry["status"] = "ok" if code == 0 else f"failed (exit {code})"
                    break
                except subprocess.TimeoutExpired:
                    if monitor is not None:
                        entry["nvidia_smi_peak_mib"] = monitor.peak
                    if progress is not None and progress(entry):
                        self.record(name, entry)
                    if time.monotonic() - start > timeout:
                        entry["status"] = f"timed out after {timeout:.0f} s"
                        break
        left_behind = stop_group(proc, grace=self.args.grace)
        self.running = None
        entry["seconds"] = round(time.monotonic() - start, 1)
        if left_behind:
            entry["left_running"] = left_behind
        if monitor is not None:
            entry["nvidia_smi_peak_mib"] = monitor.stop()
            entry["gpu_free_wait_s"] = wait_gpu_free(self.gpu_baseline, min(30.0, max(self.left(), 0.0)))
        if progress is not None:
            progress(entry)
        output = log_path.read_text(errors="replace")
        with (self.out / "gpu_check.log").open("a") as out:
            out.write(f"===== {name}: {entry['status']} in {entry['seconds']} s\n$ {entry['command']}\n")
            out.write(output[-6000:] + "\n")
        entry["output"] = output
        return entry

    def record(self, name: str, entry: dict) -> dict:
        self.result["stages"][name] = {k: v for k, v in entry.items() if k != "output"}
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1))
        (self.out / "gpu_check.md").write_text(markdown(self.result))
        if entry["status"] != "running":
            print(f"[gpu_check] {name}: {entry['status']}", flush=True)
        return entry


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, read from /proc (a child that left the process group is still found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int], pgid: int) -> set[int]:
    """Those of `pids`, and the members of process group `pgid`, that still run (zombies do not count)."""
    running = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if fields[0] != "Z" and (pid in pids or int(fields[2]) == pgid):
            running.add(pid)
    return running


def stop_group(proc: subprocess.Popen, grace: float) -> list[int]:
    """End the stage's process group and every descendant: SIGTERM, `grace` seconds, then SIGKILL; wait until none
    runs. Returns the pids still running after all that (none, unless the kernel refuses)."""
    tree = descendants(proc.pid) | {proc.pid}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        tree |= descendants(proc.pid)
        running = alive(tree, proc.pid)
        if not running:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in running:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and alive(tree, proc.pid):
            proc.poll()  # reap the direct child, so that it does not linger as a zombie of ours
            time.sleep(0.1)
    proc.poll()
    return sorted(alive(tree, proc.pid))


def gpu_memory_used() -> int | None:
    """nvidia-smi's memory.used in MiB, summed over GPUs; None without nvidia-smi."""
    try:
        used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=5).stdout  # fmt: skip
        return sum(int(v) for v in used.split())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def wait_gpu_free(baseline: int | None, timeout: float, slack_mib: int = 1024) -> float | None:
    """Seconds until the GPU's memory is back within `slack_mib` of `baseline`; None if it was not within `timeout`."""
    if baseline is None:
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start <= timeout:
        used = gpu_memory_used()
        if used is None or used <= baseline + slack_mib:
            return round(time.monotonic() - start, 1)
        time.sleep(0.5)
    return None


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
            used = gpu_memory_used()
            self.peak = max(self.peak, used or 0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# The packages the stages import, by module: (distribution, needed in CPU mode)
IMPORTS = {"torch": ("torch", True), "transformers": ("transformers", True), "trl": ("trl", True),
           "peft": ("peft", True), "accelerate": ("accelerate", True), "datasets": ("datasets", True),
           "math_verify": ("math-verify", True), "bitsandbytes": ("bitsandbytes", False),
           "score_trl.trainer": ("score_trl", True)}  # fmt: skip
VERSIONS_CODE = """
import importlib, importlib.metadata as m, json, sys
imports, found, broken = json.loads(sys.argv[1]), {}, {}
for module, dist in imports.items():
    try:
        where = importlib.import_module(module).__file__
        found[dist] = {"version": m.version(dist), "from": where}
    except Exception as err:
        broken[module] = f"{type(err).__name__}: {err}"
import torch
found["cuda"] = torch.version.cuda
found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps({"versions": found, "broken": broken}))
"""


def setup(check: Check) -> dict:
    """GPU mode: the bundle's wheels into SITE. Both modes: the tokenizer folder, then every import, with versions."""
    bundle = Path(check.args.bundle)
    if not check.args.cpu and not sorted((bundle / "wheels").glob("*.whl")):
        return check.record("setup", {"status": f"failed: no wheels in {bundle}/wheels (run `make gpu-bundle`)"})
    tokenizer = Path(check.args.tokenizer) if check.args.tokenizer else bundle / "tokenizer"
    target = check.work / "tokenizer"
    shutil.copytree(tokenizer, target, dirs_exist_ok=True)
    if (target / "tokenizer.json.gz").is_file():
        with gzip.open(target / "tokenizer.json.gz") as f, (target / "tokenizer.json").open("wb") as out:
            shutil.copyfileobj(f, out)
    imports = {module: dist for module, (dist, on_cpu) in IMPORTS.items() if on_cpu or not check.args.cpu}
    script = shlex.join([sys.executable, "-c", VERSIONS_CODE, json.dumps(imports)])
    if not check.args.cpu:  # the pinned wheels first, so that the imports below are theirs
        wheels = sorted(str(p) for p in (bundle / "wheels").glob("*.whl"))
        script = shlex.join([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--upgrade", "--target", str(SITE), *wheels]) + " && " + script  # fmt: skip
    command = ["sh", "-c", script]
    entry = check.run("setup", command)
    if entry["status"] == "ok":
        found = json.loads(entry["output"].strip().splitlines()[-1])
        entry["versions"], broken = found["versions"], found["broken"]
        if broken:
            entry["status"] = "failed: " + "; ".join(f"import {m}: {e}" for m, e in broken.items())
    return check.record("setup", entry)


def build_model(out: str, tokenizer: str, tiny: bool):
    """(Run in its own process.) gemma-2-2b's architecture with random weights and the given tokenizer."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from experiments.benchmark import GEMMA2_2B, GEMMA2_TINY

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
    overrides = ["--model_name_or_path", str(model), "--dataset_name", check.args.data, "--max_steps", "1",
                 "--stage_one_steps", "0", "--eval_strategy", "no", "--report_to", "none", "--save_strategy", "steps",
                 "--save_steps", "1", "--output_dir", str(output), "--logging_steps", "1"]  # fmt: skip
    if check.args.cpu:  # the recipe's shape on the tiny model: no bitsandbytes, no bf16, small batches and lengths
        overrides += ["--load_in_4bit", "false", "--use_bnb_nested_quant", "false", "--bf16", "false", "--use_cpu",
                      "true", "--gradient_checkpointing", "false", "--per_device_train_batch_size", "4",
                      "--num_generations", "2", "--gradient_accumulation_steps", "1", "--max_completion_length", "8",
                      "--dtype", "float32"]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", *accelerate]
    return [*launch, "scripts/train_score.py", "recipes/gemma2b.yaml", *overrides, *extra]


def single_process() -> list[str]:
    return ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]


def recipe(check: Check, model: Path, name: str, extra: list[str]) -> dict:
    """A recipe step; its figures are read from the step report as soon as the trainer logs the step."""
    report = check.work / f"{name}.steps.jsonl"
    report.unlink(missing_ok=True)
    accelerate = single_process() + (["--mixed_precision", "no"] if check.args.cpu else [
        "--config_file", "recipes/accelerate_configs/single_gpu.yaml"])  # fmt: skip
    command = recipe_command(check, model, check.work / "recipe", extra, accelerate)

    def progress(entry: dict) -> bool:
        steps = [json.loads(line) for line in report.read_text().splitlines()] if report.is_file() else []
        if len(steps) == len(entry.get("steps", [])):
            return False
        entry["steps"] = [{k: s.get(k) for k in ("step", "stage", "step_time", "loss", "reward", "turn1/reward",
                                                "turn2/reward", "kl", "num_tokens", "peak_gpu_memory_gib")}
                          for s in steps]  # fmt: skip
        entry["step_s"] = steps[-1].get("step_time")
        entry["peak_gib"] = steps[-1].get("peak_gpu_memory_gib")
        if "nvidia_smi_peak_mib" in entry:  # at the moment the step was seen, before anything after it ran
            entry["nvidia_smi_peak_mib_at_step"] = entry["nvidia_smi_peak_mib"]
        return True

    entry = check.run(name, command, progress, SCORE_TRL_STEP_REPORT=str(report))
    return check.record(name, entry)


def benchmark_command(check: Check, model: Path, out_json: Path, tokens: int, extra: list[str]) -> list[str]:
    if check.args.cpu:  # the benchmark's shape on the tiny model
        size = ["--rows", "4", "--num_generations", "2", "--tokens", str(tokens), "--lora_r", "4", "--cpu"]
    else:
        size = ["--rows", "32", "--num_generations", "4", "--tokens", str(tokens), "--lora_r", "32"]
        size += ["--load_in_4bit", "--gradient_checkpointing"]  # as the recipe
    return [sys.executable, "-m", "experiments.benchmark", "--model", str(model), "--steps", "1", "--warmup", "0",
            *size, "--output_json", str(out_json), *extra]  # fmt: skip


def tokens(check: Check, gpu_tokens: int) -> int:
    """Tokens per attempt: the GPU figure, or a tiny stand-in in CPU mode (128 -> 4, 512 -> 8)."""
    return {128: 4, 512: 8}[gpu_tokens] if check.args.cpu else gpu_tokens


def ratio(check: Check, model: Path, name: str, gpu_tokens: int) -> dict:
    out_json = check.work / f"{name}.json"
    command = benchmark_command(check, model, out_json, tokens(check, gpu_tokens), ["--backends", "generate"])
    entry = check.run(name, command)
    if entry["status"] == "ok" and out_json.is_file():
        figures = json.loads(out_json.read_text())
        entry |= {"tokens_per_attempt": tokens(check, gpu_tokens), "arms": figures["arms"],
                  "phases": figures["phases"], "ratio": figures["ratios"].get("SCoRe/RLOO")}  # fmt: skip
        entry["decode_ms_per_step"] = figures["arms"]["SCoRe"].get("decode_ms_per_step")
    return check.record(name, entry)


def backend(check: Check, model: Path, name: str) -> dict:
    stage = f"backend_{name}"
    if check.args.cpu and name in CUDA_ONLY:
        return check.record(stage, {"status": "skipped", "why": f"{CUDA_ONLY[name]} (CPU mode)"})
    out_json = check.work / f"{stage}.json"
    command = benchmark_command(check, model, out_json, tokens(check, 128), ["--arms", "SCoRe", "--backends", name])
    entry = check.run(stage, command)
    if entry["status"] == "ok" and out_json.is_file():
        arm = json.loads(out_json.read_text())["arms"]["SCoRe"]
        entry |= {k: arm.get(k) for k in ("step_median_s", "tokens_per_s", "decode_ms_per_step", "peak_memory_gib")}
    return check.record(stage, entry)


def zero2(check: Check, model: Path) -> dict:
    if check.args.cpu:
        return check.record("zero2", {"status": "skipped", "why": "this check runs DeepSpeed on CUDA only (CPU mode)"})
    sdist = sorted(Path(check.args.bundle).glob("sdist/deepspeed-*.tar.gz"))
    if not sdist:
        return check.record("zero2", {"status": "skipped", "why": "no DeepSpeed source package in the bundle"})
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
               "--target", str(SITE), str(sdist[0])]  # fmt: skip
    accelerate = ["--config_file", "recipes/accelerate_configs/zero2.yaml", "--num_processes", "1"]
    train = recipe_command(check, model, check.work / "zero2", [], accelerate)
    command = ["sh", "-c", shlex.join(install) + " && " + shlex.join(train)]
    report = check.work / "zero2.steps.jsonl"
    entry = check.run("zero2", command, DS_BUILD_OPS="0", SCORE_TRL_STEP_REPORT=str(report))
    if report.is_file():
        entry["steps"] = [json.loads(line).get("step_time") for line in report.read_text().splitlines()]
    return check.record("zero2", entry)


def measured(stages: dict) -> dict:
    """The figures the goals are read against."""
    steps = [s["step_time"] for name in ("recipe_step", "recipe_step2") for s in stages.get(name, {}).get("steps", [])
             if s.get("step_time") is not None]  # fmt: skip
    decode = {name.removeprefix("backend_"): e["decode_ms_per_step"] for name, e in stages.items()
              if name.startswith("backend_") and e.get("decode_ms_per_step")}  # fmt: skip
    if stages.get("ratio_128", {}).get("decode_ms_per_step"):
        decode["generate"] = stages["ratio_128"]["decode_ms_per_step"]
    fastest = min(decode, key=decode.get) if decode else None
    return {
        "recipe_step_s": sorted(steps)[len(steps) // 2] if steps else None,
        "recipe_peak_gib": stages.get("recipe_step", {}).get("peak_gib"),
        "decode_ms": decode.get(fastest),
        "fastest_backend": fastest,
        "decode_ms_by_backend": decode,
        "ratio": stages.get("ratio_128", {}).get("ratio"),
    }


def markdown(result: dict) -> str:
    stages = result["stages"]
    versions = stages.get("setup", {}).get("versions", {})
    shown = ", ".join(f"{k} {v['version']}" for k, v in versions.items() if isinstance(v, dict))
    lines = [
        f"# GPU check ({result['mode']} mode), {result['date']}",
        "",
        f"GPU: {versions.get('gpu') or 'none'}; CUDA {versions.get('cuda')}; {shown}",
        f"Command: `{result['command']}`; commit {result.get('commit') or 'unknown'}; budget {result['budget_s']:g} s",
        "",
        "| stage | status | seconds (limit) | figures |",
        "|---|---|---|---|",
    ]
    for name, entry in stages.items():
        figures = {k: v for k, v in entry.items() if isinstance(v, int | float) and k not in
                   ("seconds", "limit_s", "pgid")}  # fmt: skip
        cells = ", ".join(f"{k} {v:.3g}" for k, v in figures.items())
        seconds = f"{entry.get('seconds', '–')} ({entry.get('limit_s', '–')})"
        lines.append(f"| {name} | {entry['status']} | {seconds} | {cells or entry.get('why', '')} |")
    figures = measured(stages)
    lines += ["", "| goal | measured | goal | met |", "|---|---|---|---|"]
    for label, key, goal, unit in GOALS:
        value = figures[key]
        shown = "missing" if value is None else f"{value:.3g} {unit}"
        met = "–" if value is None or result["mode"] == "cpu" else ("yes" if value <= goal else "no")
        lines.append(f"| {label} | {shown} | ≤ {goal:g} {unit} | {met} |")
    if figures["decode_ms_by_backend"]:
        lines += ["", "| backend | ms per decode step |", "|---|---|"]
        ranked = sorted(figures["decode_ms_by_backend"].items(), key=lambda item: item[1])
        lines += [f"| {name} | {ms:.3g} |" for name, ms in ranked]
        lines += ["", f"Fastest generation backend here: {figures['fastest_backend']}."]
    return "\n".join(lines) + "\n"


def format_timeline() -> str:
    stages, limit = timeline(), limits()
    lines = ["| stage | expected on an H200 (s) | limit (s) | runs |", "|---|---|---|---|"]
    lines += [f"| {name} | {expected:.0f} | {limit[name]:.0f} | {'always' if required else 'with budget left'} |"
              for name, expected, required in stages]  # fmt: skip
    required = sum(limit[name] for name, _, req in stages if req)
    return "\n".join(lines + [f"\nRequired stages' limits: {required:.0f} s of the 480 s budget."])


def parse_limit(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in {n for n, _, _ in timeline()} or not seconds:
        raise argparse.ArgumentTypeError(f"--limit {text}: use STAGE=SECONDS, STAGE one of {limits()}")
    return name, float(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="gpu_check", help="Folder for gpu_check.json, .md and .log.")
    parser.add_argument("--work", default="/tmp/score_trl_gpu_check", help="Scratch folder (model, checkpoints).")
    parser.add_argument("--bundle", default=str(ROOT / ".gpu_bundle"), help="`make gpu-bundle`'s folder.")
    parser.add_argument("--cpu", action="store_true", help="CPU mode: tiny Gemma 2, no bitsandbytes, no DeepSpeed.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the bundle's).")
    parser.add_argument("--data", default=None, help="GSM8K-format JSONL (default: the bundle's rows).")
    parser.add_argument("--budget", type=float, default=None, help="Seconds for every stage together (480 x scale).")
    parser.add_argument("--scale", type=float, default=None, help="Every limit times this (default 1; CPU mode 3).")
    parser.add_argument("--limit", type=parse_limit, action="append", help="STAGE=SECONDS: one stage's own limit.")
    parser.add_argument("--grace", type=float, default=10.0, help="Seconds between SIGTERM and SIGKILL at a limit.")
    parser.add_argument("--timeline", action="store_true", help="Print each stage's expected seconds and limit.")
    parser.add_argument("--_build_model", nargs=2, metavar=("OUT", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build_model:
        return build_model(*args._build_model, tiny=args.cpu)
    if args.timeline:
        return print(format_timeline())
    args.data = args.data or str(Path(args.bundle) / "data" / "gsm8k_train.jsonl")
    check = Check(args)

    def interrupted(signum, frame):  # the device call's own limit: leave nothing running behind
        if check.running is not None:
            stop_group(check.running, grace=2.0)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    if setup(check)["status"] != "ok":
        return
    model = check.work / "model"
    build = [sys.executable, __file__, "--_build_model", str(model), str(check.work / "tokenizer")]
    if check.record("model", check.run("model", build + (["--cpu"] if args.cpu else [])))["status"] != "ok":
        return
    recipe(check, model, "recipe_step", [])
    for name in BACKENDS:
        if name in REQUIRED_BACKENDS:
            backend(check, model, name)
    ratio(check, model, "ratio_128", 128)
    for name in BACKENDS:
        if name not in REQUIRED_BACKENDS:
            backend(check, model, name)
    recipe(check, model, "recipe_step2", ["--max_steps", "2", "--resume_from_checkpoint", "last"])
    ratio(check, model, "ratio_512", 512)
    zero2(check, model)


if __name__ == "__main__":
    main()
