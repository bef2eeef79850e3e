import math
import signal
from dataclasses import dataclass, field

from trl import RLOOConfig


CORRECT_THRESHOLD = 0.5  # a reward at or above it counts as a correct attempt (0/1 verifiers: 1 is correct)
# How the correction turn follows an attempt for plain-text (standard) prompts: a separator, the correction (feedback
# and instruction), a separator before the next attempt
PLAIN_CORRECTION_FORMAT = "\n\n{correction}\n\n"


# The paper's self-correction instruction for MATH (Kumar et al. 2024, Appendix), used as the default.
MATH_CORRECTION_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the question. Please correct "
    "the error, if any, and rewrite the solution. Only output the final solution! At the end of the Solution, when "
    'you give your final answer, write it in the form "Final Answer: The final answer is $answer$. I hope it is '
    'correct."'
)


@dataclass
class SCoReConfig(RLOOConfig):
    r"""
    Configuration class for [`SCoReTrainer`].

    Inherits every parameter of [`~trl.RLOOConfig`]. What differs:

    - Each prompt gets `num_attempts` attempts (two by default, as in the paper): the first attempt y1, then the
      correction instruction as a new user turn, then a second attempt y2, and so on. Every attempt is trained; the
      instruction tokens are attended to but never trained.
    - Training runs in two stages on one schedule: Stage I for the first `stage_one_steps` optimizer steps, then
      Stage II. Stage I trains turn 2 on r(y2) with `beta` KL and holds turn 1 to the reference with `beta2` KL only;
      Stage II trains turn 1 on r(y1) and turn 2 on r(y2) + `alpha`·(r(y2) − r(y1)), with `beta` KL on both turns.
      With K > 2 attempts, every later attempt t is trained like turn 2, on r(y_t) in Stage I and on
      r(y_t) + `alpha`·(r(y_t) − r(y_{t−1})) in Stage II (a bonus for what it changed relative to the attempt it
      corrects), with `beta` KL; Stage I still pins only turn 1 with `beta2`.
    - The KL is a per-token loss term (the k3 estimator exp(ref − logp) − (ref − logp) − 1, summed over each turn's
      tokens) instead of RLOO's first-order penalty folded into the reward: a penalty in the reward only reaches turn 1
      through a noisy leave-one-out advantage, while the loss term pulls every turn-1 token towards the reference
      directly, which is what Stage I relies on. Rewards, advantages and the logged `reward` carry no KL.
    - Advantages are RLOO's leave-one-out baseline computed per turn within each prompt's group of `num_generations`.

    - When training is on-policy (each generation batch is consumed within one optimizer step:
      `gradient_accumulation_steps` a multiple of `steps_per_generation * num_iterations`), the sampling policy's
      log-probs are the detached training ones, so their no-grad pass is skipped (as GRPOTrainer does). Only attempt
      tokens go through the LM head: prompt, injected correction turn and padding are never projected.

    - Resuming from `"last"` (or `True`) takes the newest *complete* checkpoint, skipping ones a kill cut short
      (`score_trl.checkpoints`); `preemption_signals` turn SIGTERM/SIGUSR1 into a checkpoint and a clean exit, and
      `reward_timeout` bounds a reward call.

    Defaults changed from [`~trl.RLOOConfig`]: `beta` is β1 = 0.01 and `learning_rate` 5e-6, the paper's values;
    `bf16` is on only where a bf16-capable GPU is present; `disable_dropout` is True, so that the policy that samples
    is the one that is scored (LoRA's default dropout of 0.05 would otherwise make them differ, and costs time).

    Parameters:
        num_attempts (`int`, *optional*, defaults to `2`):
            Attempts per prompt: y1 and `num_attempts - 1` corrections, each after the correction instruction. The
            packed training row grows by one instruction turn and one attempt per extra attempt.
        stage_one_steps (`int`, *optional*, defaults to `100`):
            Number of optimizer steps trained in Stage I before switching to Stage II. `0` skips Stage I; a value of
            at least `max_steps` trains Stage I only.
        beta2 (`float`, *optional*, defaults to `0.1`):
            β2, the KL coefficient that holds turn 1 near the reference model in Stage I (paper: 0.1, 0.25 for code).
        alpha (`float`, *optional*, defaults to `10.0`):
            α, the Stage II bonus on turn 2: its reward is r(y2) + α·(r(y2) − r(y1)).
        correction_instruction (`str`, *optional*):
            The self-correction instruction sent as the user turn between the two attempts, for every row. When
            `None`, each row's `correction_instruction` column is used (`score_trl.data` sets the task's wording),
            and rows without one get the paper's MATH instruction.
        correction_feedback (`str` or callable, *optional*, defaults to `"none"`):
            What the correction turn says about the attempt just made, placed before the instruction
            (`score_trl.feedback`): `"none"` (the paper: the instruction alone), `"verdict"` (one bit from the
            reward: "Your answer is incorrect." or "Your answer is correct."), `"tests"` (code: the sandbox's result
            on the row's `visible_tests` only, never the hidden tests), or a function with the reward signature (or
            its dotted path) that returns one string per row, None for none; it also receives `rewards`, the
            attempt's rewards. Feedback tokens are attended to and never trained. Evaluate with the same feedback
            (`score-eval --correction_feedback`).
        feedback_max_tokens (`int`, *optional*, defaults to `256`):
            Feedback longer than this many tokens is cut and counted (`feedback/truncated_after_turn{t}`).
        plain_correction_format (`str`, *optional*, defaults to `"\\n\\n{correction}\\n\\n"`):
            For plain-text (standard) prompts, as base models take: the text appended after an attempt, `{correction}`
            being the correction turn (feedback and instruction). Tokenized on its own and appended to the sampled
            ids, as the chat turn is.
        stop_strings (`list[str]`, *optional*):
            Strings that end an attempt, for base models that do not emit EOS: the attempt keeps its tokens up to the
            one that completes the first stop string and counts as finished.
        correct_threshold (`float`, *optional*, defaults to `0.5`):
            An attempt counts as correct, for the self-correction metrics and the verdict feedback, when its reward
            is at least this.
        max_unscorable_steps (`int`, *optional*, defaults to `3`):
            Training stops with an error after this many consecutive generation batches in which every reward
            function returned None for every row and attempt. `0` never stops.
        reward_timeout (`float`, *optional*):
            Seconds one synchronous reward call (one attempt's batch) may take before training stops with an error
            that names the function, the attempt and the step. `None` (default) sets no limit.
        preemption_signals (`list[str]`, *optional*, defaults to `["SIGTERM", "SIGUSR1"]`):
            Signals on which every rank finishes the current optimizer step, saves a complete checkpoint and exits with
            status 75 (`score_trl.preemption`; `score-train` exits, `SCoReTrainer.train` returns with `preempted_at`
            set). `[]` leaves the signals' default handling.
        compile_generation (`bool`, *optional*, defaults to `False`):
            Compile the decoding step (with `cache_implementation="static"`); RLOOTrainer disables compilation. Takes
            effect on GPUs, where transformers compiles; the rollout is the same tokens either way.
        generation_weights (`str`, *optional*, defaults to `"policy"`):
            `"policy"` samples from the training model; `"merged"` from a copy of the base in the training dtype with
            the LoRA adapter merged in, rebuilt after every optimizer step (`score_trl.merged_generation`): for 4-bit
            models, decoding then runs at bf16 speed. PEFT models only; costs a second copy of the weights.
        logprob_batch_size (`int`, *optional*):
            Rows per forward in the no-grad log-prob passes (reference model and, when off-policy, the sampling
            policy). `None` uses `per_device_train_batch_size` (`per_device_eval_batch_size` in evaluation).
    """

    learning_rate: float = field(
        default=5e-6,
        metadata={"help": "The initial learning rate for AdamW (paper: 5e-6)."},
    )
    beta: float = field(
        default=0.01,
        metadata={
            "help": "β1: KL coefficient on turn 2 in Stage I and on both turns in Stage II (paper: 0.01). Must be > 0 "
            "when beta2 > 0, since RLOO drops the reference model when beta is 0."
        },
    )
    beta2: float = field(
        default=0.1,
        metadata={
            "help": "β2: KL coefficient holding turn 1 near the reference in Stage I (paper: 0.1, 0.25 for code)."
        },
    )
    alpha: float = field(
        default=10.0,
        metadata={"help": "α: Stage II reward on turn 2 is r(y2) + alpha * (r(y2) - r(y1)) (paper: 10)."},
    )
    num_attempts: int = field(
        default=2,
        metadata={
            "help": "Attempts per prompt (>= 2): y1, then num_attempts - 1 corrections. Attempt t >= 2 is trained on "
            "r_t + alpha * (r_t - r_{t-1}) in Stage II. The paper uses 2."
        },
    )
    stage_one_steps: int = field(
        default=100,
        metadata={
            "help": "Optimizer steps trained in Stage I before Stage II starts. 0 skips Stage I; a value >= max_steps "
            "trains Stage I only."
        },
    )
    correction_instruction: str | None = field(
        default=None,
        metadata={
            "help": "User turn inserted between the first and second attempt, for every row. None: each row's "
            "`correction_instruction` column (set per task by score_trl.data), else the paper's MATH instruction."
        },
    )
    correction_feedback: str = field(
        default="none",
        metadata={
            "help": "What the correction turn says about the attempt just made, before the instruction: none (the "
            "paper), verdict (one bit from the reward: 'Your answer is incorrect.' / 'Your answer is correct.'), "
            "tests (code: the sandbox's result on the row's visible_tests only), or a dotted path to a function with "
            "the reward signature returning one string (or None) per row; in Python, the function itself."
        },
    )
    feedback_max_tokens: int | None = field(
        default=256,
        metadata={"help": "Feedback longer than this many tokens is cut (and counted). None: no limit."},
    )
    plain_correction_format: str = field(
        default=PLAIN_CORRECTION_FORMAT,
        metadata={
            "help": "Plain-text (standard) prompts only: the text appended after an attempt, with {correction} the "
            "correction turn (feedback and instruction), e.g. '\\n\\nQ: {correction}\\nA:' for a few-shot format. "
            "Tokenized on its own, so the sampled tokens stay as sampled."
        },
    )
    stop_strings: list[str] | None = field(
        default=None,
        metadata={
            "help": "Strings that end an attempt, for base models that do not emit EOS (e.g. the separator that would "
            "start a new question). The attempt keeps its tokens up to the one that completes the first stop string; "
            "such an attempt counts as finished, not truncated."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Disable dropout (LoRA's included) in the policy and the reference, so the policy that samples is "
            "the one that is scored. Default True, unlike RLOOConfig."
        },
    )
    logprob_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per forward in the no-grad log-prob passes (reference and, off-policy, sampling policy). "
            "None: per_device_train_batch_size (per_device_eval_batch_size in evaluation)."
        },
    )
    max_unscorable_steps: int = field(
        default=3,
        metadata={
            "help": "Stop training after this many consecutive generation batches in which every reward is None "
            "(nothing scorable, so nothing learned). 0 never stops."
        },
    )
    reward_timeout: float | None = field(
        default=None,
        metadata={
            "help": "Seconds a synchronous reward function may take for one attempt's batch; a call that takes longer "
            "stops training like any reward failure, naming the function, the attempt and the step. None: no limit "
            "(code rewards have their own per-program timeout)."
        },
    )
    preemption_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        metadata={
            "help": "Signals that make training finish the current optimizer step, save a complete checkpoint on "
            "every rank and exit with status 75; resume with resume_from_checkpoint=last. SIGTERM: Kubernetes, spot "
            "instances, Slurm at the time limit; SIGUSR1: Slurm's --signal=USR1@SECONDS. [] keeps the default "
            "handlers."
        },
    )
    compile_generation: bool = field(
        default=False,
        metadata={
            "help": "Let transformers compile the decoding step (torch.compile, CUDA graphs) with "
            "cache_implementation='static'. RLOOTrainer always disables it; it is a GPU speed-up (on CPU transformers "
            "does not compile, and the flag changes nothing)."
        },
    )
    generation_weights: str = field(
        default="policy",
        metadata={
            "help": "policy: sample from the training model, as RLOO does. merged: sample (padded generate) from a "
            "copy of the base in the training dtype with the LoRA adapter merged in, rebuilt after every optimizer "
            "step: for 4-bit (QLoRA) models, decoding then skips bitsandbytes' dequantization. PEFT only; costs a "
            "second copy of the weights."
        },
    )
    correct_threshold: float = field(
        default=CORRECT_THRESHOLD,
        metadata={
            "help": "An attempt counts as correct in the self-correction metrics (accuracy, incorrect->correct, "
            "correct->incorrect) when its reward is >= this value."
        },
    )

    def __post_init__(self):
        # RLOOConfig turns bf16 on by default, which TrainingArguments refuses on a machine without a bf16 device
        if self.bf16 is None and not self.fp16 and not bf16_device_available(self.use_cpu):
            self.bf16 = False
        # Checked before RLOOConfig's own checks so that the message names SCoRe's requirement and the fix.
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: SCoRe's leave-one-out baseline compares each attempt with "
                "the other first attempts of the same prompt, so it needs at least 2. Set num_generations >= 2."
            )
        if self.num_attempts < 2:
            raise ValueError(
                f"num_attempts={self.num_attempts}: SCoRe needs a first attempt and at least one correction. Set "
                "num_attempts >= 2 (the paper uses 2)."
            )
        for name in ("beta", "beta2", "alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is negative; KL and bonus coefficients must be >= 0.")
        if self.stage_one_steps < 0:
            raise ValueError(
                f"stage_one_steps={self.stage_one_steps} is negative. Use 0 to skip Stage I, or a positive number of "
                "optimizer steps."
            )
        if self.beta == 0 and self.beta2 > 0 and self.stage_one_steps > 0:
            raise ValueError(
                "beta=0 makes RLOOTrainer skip the reference model, but Stage I needs it for beta2 (the KL that holds "
                "turn 1 near the reference). Set beta > 0 (paper: 0.01), or beta2=0 to train without a reference."
            )
        if self.max_unscorable_steps < 0:
            raise ValueError(f"max_unscorable_steps={self.max_unscorable_steps}: use 0 (never stop) or a count > 0.")
        if self.logprob_batch_size is not None and self.logprob_batch_size < 1:
            raise ValueError(f"logprob_batch_size={self.logprob_batch_size}: set a positive number of rows, or None.")
        self._check_generation_and_failure_settings()
        self._check_feedback()
        if self.correction_instruction is not None and not self.correction_instruction.strip():
            raise ValueError(
                "correction_instruction is empty; give the instruction that asks for a second attempt, or leave it "
                "unset (None) to use each row's `correction_instruction` column or the paper's MATH instruction."
            )
        super().__post_init__()

        self._check_stage_switch()

    def _check_generation_and_failure_settings(self):
        if self.compile_generation and self.cache_implementation != "static":
            raise ValueError(
                f"compile_generation=True with cache_implementation={self.cache_implementation!r}: transformers "
                "compiles decoding only over a fixed-size cache. Set cache_implementation='static', or drop "
                "compile_generation."
            )
        if self.generation_weights not in ("policy", "merged"):
            raise ValueError(f"generation_weights={self.generation_weights!r}: use 'policy' or 'merged'.")
        if self.generation_weights == "merged" and (self.use_vllm or self.use_transformers_continuous_batching):
            raise ValueError(
                "generation_weights='merged' samples with padded generate from a merged copy; it does not combine "
                "with use_vllm or use_transformers_continuous_batching (vLLM already holds merged weights)."
            )
        if self.reward_timeout is not None and self.reward_timeout <= 0:
            raise ValueError(f"reward_timeout={self.reward_timeout}: give seconds > 0, or None for no limit.")
        unknown = [s for s in self.preemption_signals if not isinstance(getattr(signal, s, None), signal.Signals)]
        if unknown:
            raise ValueError(
                f"preemption_signals={self.preemption_signals}: {unknown} are not signal names of this platform. Use "
                "names such as SIGTERM and SIGUSR1, or [] to keep the default handlers."
            )

    def _check_feedback(self):
        from .feedback import FEEDBACK_MODES

        # A function is kept aside and named in the field, so that the config stays serializable (to_dict, loggers)
        if callable(self.correction_feedback):
            self._feedback_function = self.correction_feedback
            self.correction_feedback = f"{self.correction_feedback.__module__}.{self.correction_feedback.__qualname__}"
        spec = self.correction_feedback
        if spec not in FEEDBACK_MODES and ("." not in spec.strip(".:") and ":" not in spec):
            raise ValueError(
                f"correction_feedback={spec!r}: use one of {list(FEEDBACK_MODES)}, or a dotted path to a function "
                "with the reward signature that returns one string (or None) per row, e.g. 'my_package.judges.judge'."
            )
        if "{correction}" not in self.plain_correction_format:
            raise ValueError(
                f"plain_correction_format={self.plain_correction_format!r} has no {{correction}}: the correction turn "
                "must appear in it, e.g. '\\n\\n{correction}\\n\\n'."
            )
        if self.stop_strings is not None and not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings={self.stop_strings}: give non-empty strings, or None.")
        if self.feedback_max_tokens is not None and self.feedback_max_tokens < 1:
            raise ValueError(f"feedback_max_tokens={self.feedback_max_tokens}: give a number of tokens >= 1, or None.")

    @property
    def feedback_function(self):
        """`correction_feedback` as `feedback.resolve_feedback` takes it: the function given, or the setting."""
        return getattr(self, "_feedback_function", None) or self.correction_feedback

    def _check_stage_switch(self):
        # Generation happens every `steps_per_generation * num_iterations` micro-steps and a whole generation batch is
        # trained under the stage it was generated in, so the switch can only land on a generation boundary.
        micro_steps_per_generation = self.steps_per_generation * self.num_iterations
        switch_micro_step = self.stage_one_steps * self.gradient_accumulation_steps
        if switch_micro_step % micro_steps_per_generation != 0:
            period = micro_steps_per_generation // math.gcd(
                micro_steps_per_generation, self.gradient_accumulation_steps
            )
            below = self.stage_one_steps // period * period
            nearest = " or ".join(str(n) for n in (below, below + period) if n > 0)
            raise ValueError(
                f"stage_one_steps={self.stage_one_steps} does not fall on a generation boundary: a generation batch "
                f"is reused for {micro_steps_per_generation} micro-steps (steps_per_generation * num_iterations) and "
                f"each optimizer step has {self.gradient_accumulation_steps} (gradient_accumulation_steps), so the "
                f"stages can switch every {period} steps: set stage_one_steps={nearest} (or change those settings)."
            )


def bf16_device_available(use_cpu: bool = False) -> bool:
    """bf16 only where a bf16-capable GPU is used: TrainingArguments refuses bf16 anywhere else."""
    import torch

    return not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
