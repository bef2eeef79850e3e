"""SCoReTrainer on a tiny Gemma2: rollout layout, log-probs, loss assembly, training steps, resume, logging."""

import math

import pytest
import torch
from peft import LoraConfig
from trl.trainer.utils import pad

from score_trl import SCoReTrainer
from score_trl.feedback import VERDICT_CORRECT, VERDICT_INCORRECT, correction_text
from score_trl.generation import cache_blocks, cpu_cache_config
from score_trl.stats import change_flags
from score_trl.turns import instruction_for, next_attempt_prompts

from conftest import grouped_inputs, letter_reward, make_args, make_trainer, toy_dataset, toy_question


# Each generation backend (TRL 1.16's own knobs) must keep the rollout exact: same layout, same log-probs
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # ΔW != 0 from the start
BACKENDS = {
    "generate": {},
    "static_cache": {"cache_implementation": "static", "compile_generation": True},  # compiles on GPUs only
    "continuous_batching": {"use_transformers_continuous_batching": True},
    "merged": {"generation_weights": "merged", "peft_config": LORA},  # a merged copy (float32 on CPU)
}


@pytest.mark.parametrize(
    "backend, num_attempts",
    [("generate", 2), ("static_cache", 2), ("continuous_batching", 2), ("merged", 2), ("generate", 3)],
    ids=["generate", "static_cache", "continuous_batching", "merged", "three_attempts"],
)
def test_rollout_layout_keeps_sampled_first_attempt(tmp_path, tiny_model_dir, tokenizer, backend, num_attempts):
    trainer = make_trainer(
        tmp_path, tiny_model_dir, tokenizer, max_completion_length=6, num_attempts=num_attempts, **BACKENDS[backend]
    )
    trainer.model.train()
    inputs = grouped_inputs(trainer)
    batch = trainer._generate_and_score_completions(inputs)
    bridge = trainer._turns.bridge(instruction_for({}))
    generation_prompt = tokenizer.encode("<start_of_turn>model\n", add_special_tokens=False)
    for ids, mask, turns in zip(batch["completion_ids"], batch["completion_mask"], batch["turn_ids"], strict=True):
        ids, turns = ids[mask.bool()].tolist(), turns[mask.bool()].tolist()
        start = 0
        for t in range(1, num_attempts + 1):  # y1, injected turn, y2, injected turn, ..., yK
            length = turns.count(t)
            assert turns[start : start + length] == [t] * length
            attempt = ids[start : start + length]
            start += length
            if t == num_attempts:
                assert start == len(ids)
                break
            injected = bridge.after(attempt)
            assert ids[start : start + len(injected)] == injected
            assert turns[start : start + len(injected)] == [0] * len(injected)
            assert injected[-len(generation_prompt) :] == generation_prompt
            start += len(injected)
    # The table rows are aligned with what was scored: re-scoring each logged attempt gives the logged reward
    logs = trainer._attempt_logs
    for t in range(1, num_attempts + 1):
        rescored = letter_reward([[{"content": text}] for text in logs[f"attempt_{t}"]])
        assert list(logs[f"reward_{t}"]) == pytest.approx(rescored)
    if backend == "continuous_batching":  # on CPU the cache holds this call's requests, one 256-token page each here
        assert trainer.continuous_batching_config.num_blocks == len(inputs)


def test_cpu_continuous_batching_cache_is_sized_for_the_call():
    # Whole pages per request: 10 + 6 tokens -> 1, 300 + 6 -> 2, 250 + 6 = 256 -> exactly 1
    assert cache_blocks([10, 300, 250], max_new_tokens=6) == 4
    config = cpu_cache_config({"page_size": 16, "max_batch_tokens": 64}, [[1] * 20, [1] * 3], max_new_tokens=6)
    assert (config.num_blocks, config.page_size, config.max_batch_tokens) == (2 + 1, 16, 64)
    assert cpu_cache_config({"num_blocks": 7}, [[1] * 900], max_new_tokens=6).num_blocks == 7  # the user's setting


@pytest.mark.parametrize("backend", ["generate", "static_cache", "merged", "feedback", "plain"])
def test_turn_two_logps_match_generation_logits(tmp_path, tiny_model_dir, tokenizer, backend):
    # feedback: each row's correction turn carries a different verdict or test report (built per row from ids);
    # plain: plain-text prompts, the correction appended as text (`turns.plain_bridge`)
    variant, backend = (backend, "generate") if backend in ("feedback", "plain") else (None, backend)
    temperature = 0.7
    trainer = make_trainer(
        tmp_path, tiny_model_dir, tokenizer, temperature=temperature, max_completion_length=10, **BACKENDS[backend]
    )
    assert trainer.generation_config.cache_implementation == BACKENDS[backend].get("cache_implementation")
    assert trainer.generation_config.disable_compile is not BACKENDS[backend].get("compile_generation", False)
    model = trainer.model.eval()
    sampler = model
    questions = [toy_question("cat"), "Say red.", toy_question("green") + " " + toy_question("moon"), "Say one two."]
    prompts = questions if variant == "plain" else [[{"role": "user", "content": q}] for q in questions]
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    torch.manual_seed(1)
    y1 = trainer._generate_single_turn(prompt_ids, None, {})
    if backend == "merged":  # y1 came from the merged copy; y2 is sampled from it below
        sampler = trainer._merged.model
    feedback = [VERDICT_INCORRECT, VERDICT_CORRECT, None, "Your code failed this test:\nassert f(1) == 2"]
    texts = [correction_text(instruction_for({}), f if variant == "feedback" else None) for f in feedback]
    bridges = [trainer._turns.bridge(text, plain=variant == "plain") for text in texts]
    appended, turn_two_prompts = next_attempt_prompts(prompt_ids, y1, bridges)
    assert len({len(p) for p in turn_two_prompts}) > 1, "the test needs left padding"

    # Sample y2 with HF generate on the left-padded turn-2 prompts and keep the raw logits of each step
    pad_id = tokenizer.pad_token_id
    prompt_tensors = [torch.tensor(p) for p in turn_two_prompts]
    padded = pad(prompt_tensors, pad_id, "left")
    attention = pad([torch.ones_like(p) for p in prompt_tensors], 0, "left")
    with torch.no_grad():
        out = sampler.generate(
            input_ids=padded,
            attention_mask=attention,
            generation_config=trainer.generation_config,
            output_logits=True,
            return_dict_in_generate=True,
        )
    sampled = out.sequences[:, padded.size(1) :]
    logits = torch.stack(out.logits, dim=1).float()
    generation_logps = torch.log_softmax(logits / temperature, dim=-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    y2 = []
    for row in sampled.tolist():  # keep up to and including the first EOS, as the trainer does
        ends = [i for i, tok in enumerate(row) if tok in trainer.eos_token_ids]
        y2.append(row[: ends[0] + 1] if ends else row)

    # Score y2 in the training layout (x left-padded | y1 + correction turn + y2 right-padded)
    layout = trainer._training_layout(prompt_ids, [y1, y2], [appended])
    input_ids = torch.cat([layout["prompt_ids"], layout["completion_ids"]], dim=1)
    attention_mask = torch.cat([layout["prompt_mask"], layout["completion_mask"]], dim=1)
    with torch.no_grad():
        # The trainer's pass projects only attempt tokens; RLOO's projects every completion position
        logps, _, _ = trainer._turn_logps(model, input_ids, attention_mask, layout["turn_ids"] > 0)
        rloo_logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, layout["completion_ids"].size(1)
        )
    for i in range(len(prompts)):
        trained = logps[i][layout["turn_ids"][i] == 2]
        assert trained.numel() == len(y2[i])
        torch.testing.assert_close(trained, generation_logps[i, : len(y2[i])], atol=1e-5, rtol=0)
    attempts = layout["turn_ids"] > 0
    torch.testing.assert_close(logps[attempts], rloo_logps[attempts], atol=1e-6, rtol=0)
    assert torch.all(logps[~attempts] == 0)  # injected turn and padding never reach the LM head


def independent_loss(model, batch, temperature, epsilon):
    """The SCoRe loss written out from a plain forward pass (no fused head, no helper from score_trl)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    length = batch["completion_ids"].size(1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, -length - 1 : -1].float()
    logps = torch.log_softmax(logits / temperature, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    ref = batch["ref_per_token_logps"]
    total = 0.0
    rows = input_ids.size(0)
    for i in range(rows):
        for t in range(1, batch["kl_coef"].size(1) + 1):
            m = batch["turn_ids"][i] == t
            # On-policy the trainer skips the sampling pass and uses the detached training log-probs: ratio 1
            old = logps[i][m].sum().detach() if batch["old_logps"] is None else batch["old_logps"][i, t - 1]
            ratio = torch.exp(logps[i][m].sum() - old)
            adv = batch["advantages"][i, t - 1]
            policy = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
            d = ref[i][m] - logps[i][m]
            kl = (torch.exp(d) - d - 1).sum()
            total = total + policy + batch["kl_coef"][i, t - 1] * kl
    return total / rows


@pytest.mark.parametrize(
    "on_policy, num_attempts",
    [(True, 2), (False, 2), (True, 3), (False, 3)],
    ids=["on_policy", "off_policy", "three_attempts_on_policy", "three_attempts_off_policy"],
)
def test_advantages_kl_weights_and_loss_per_stage(tmp_path, tiny_model_dir, tokenizer, on_policy, num_attempts):
    alpha, beta, beta2 = 10.0, 0.05, 0.3
    # steps_per_generation=2 with one micro-step per optimizer step reuses a generation batch across two optimizer
    # steps: off-policy, so the sampling policy's log-probs get their own pass
    schedule = dict(stage_one_steps=1) if on_policy else dict(stage_one_steps=2, steps_per_generation=2)
    trainer = make_trainer(
        tmp_path, tiny_model_dir, tokenizer, alpha=alpha, beta=beta, beta2=beta2, num_attempts=num_attempts, **schedule
    )
    trainer.model.train()
    inputs = grouped_inputs(trainer)
    generator = torch.Generator().manual_seed(0)
    passes = []
    turn_logps = trainer._turn_logps
    trainer._turn_logps = lambda *args, **kwargs: passes.append(torch.is_grad_enabled()) or turn_logps(*args, **kwargs)
    for step, stage in ((0, 1), (schedule["stage_one_steps"], 2)):
        trainer.state.global_step = step
        passes.clear()
        batch = trainer._generate_and_score_completions(inputs)
        # No-grad passes in the rollout: the reference, plus the sampling policy only when off-policy
        assert passes == [False] * (1 if on_policy else 2)
        assert (batch["old_logps"] is None) == on_policy
        expected_coef = [beta2 if stage == 1 else beta] + [beta] * (num_attempts - 1)
        assert batch["kl_coef"].tolist() == [pytest.approx(expected_coef)] * 4

        # Hand-computed leave-one-out advantages for groups of two from the logged rewards: Stage I trains attempt
        # t >= 2 on r_t, Stage II attempt 1 on r_1 and attempt t >= 2 on r_t + alpha (r_t - r_{t-1})
        r = [torch.tensor(list(trainer._attempt_logs[f"reward_{t}"])[-4:]) for t in range(1, num_attempts + 1)]
        partner = torch.tensor([1, 0, 3, 2])
        if stage == 1:
            shaped = [torch.zeros(4)] + r[1:]
        else:
            shaped = [r[0]] + [r[t] + alpha * (r[t] - r[t - 1]) for t in range(1, num_attempts)]
        expected = torch.stack([x - x[partner] for x in shaped], dim=1)
        torch.testing.assert_close(batch["advantages"], expected, atol=1e-6, rtol=0)

        # Move the policy away from both the sampling policy and the reference, then compare the losses
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        loss = trainer._compute_loss(trainer.model, batch)
        with torch.no_grad():
            manual = independent_loss(trainer.model, batch, trainer.temperature, trainer.epsilon_low)
        assert manual.abs() > 1e-4
        torch.testing.assert_close(loss.detach(), manual, atol=1e-5, rtol=1e-5)


EXPECTED_METRICS = [
    "stage",
    "turn1/reward",
    "turn2/reward",
    "turn1/kl",
    "turn2/kl",
    "turn1/completions/mean_length",
    "turn2/completions/mean_length",
    "turn1/completions/clipped_ratio",
    "turn2/completions/clipped_ratio",
    "turn1/rewards/letter_reward/mean",
    "self_correction/reward_delta",
    "self_correction/incorrect_to_correct",
    "self_correction/correct_to_incorrect",
    "self_correction/accuracy_t1",
    "self_correction/accuracy_t2",
    "self_correction/text_changed",
    "self_correction/answer_changed",
    "entropy",
    "turn1/clip_ratio/low_mean",
    "turn2/clip_ratio/high_mean",
    "num_tokens",
]


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_stage_one_then_two_training(tmp_path, tiny_model_dir, tokenizer, use_lora):
    peft_config = (
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if use_lora else None
    )
    trainer = make_trainer(
        tmp_path, tiny_model_dir, tokenizer, n=16, max_steps=4, stage_one_steps=2, peft_config=peft_config
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["stage"] for h in logs] == [1.0, 1.0, 2.0, 2.0]
    assert all(math.isfinite(h["loss"]) for h in logs)
    for key in EXPECTED_METRICS:
        assert key in logs[-1], key
    assert any(h["turn1/kl"] > 0 for h in logs[1:])  # the reference differs from the policy once it trained

    after = dict(trainer.model.named_parameters())
    trainable = [n for n, p in after.items() if p.requires_grad]
    assert trainable and any(not torch.equal(before[n], after[n]) for n in trainable)
    if use_lora:
        assert all("lora_" in n for n in trainable)
        frozen = [n for n in after if "lora_" not in n]
        assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
        assert trainer.ref_model is None  # reference = the adapter-disabled base, no second copy
    else:
        assert trainer.ref_model is not None
        ref = dict(trainer.ref_model.named_parameters())
        assert all(torch.equal(before[n], ref[n]) for n in ref)


def test_logged_change_shares_match_the_attempts(tmp_path, tiny_model_dir, tokenizer):
    # The per-step text/answer change shares are those of the batch's own attempts (the completions record)
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, n=16, max_steps=2, stage_one_steps=1)
    trainer.train()
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    first, second = list(trainer._attempt_logs["attempt_1"]), list(trainer._attempt_logs["attempt_2"])
    assert len(first) == trainer.args.generation_batch_size
    text_changed, answer_changed = change_flags(first, second)
    assert last["self_correction/text_changed"] == pytest.approx(sum(text_changed) / len(first))
    assert last["self_correction/answer_changed"] == pytest.approx(sum(answer_changed) / len(first))
    assert last["self_correction/answer_changed"] <= last["self_correction/text_changed"]


@pytest.mark.parametrize("num_attempts", [2, 3], ids=["two_attempts", "three_attempts"])
def test_resume_continues_in_the_same_stage_and_step(tmp_path, tiny_model_dir, tokenizer, num_attempts):
    kwargs = dict(n=16, max_steps=4, stage_one_steps=2, save_strategy="steps", save_steps=1, num_attempts=num_attempts)
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, **kwargs)
    trainer.train()
    assert [h["stage"] for h in trainer.state.log_history if "loss" in h] == [1.0, 1.0, 2.0, 2.0]

    for checkpoint, expected in (("checkpoint-1", [1.0, 2.0, 2.0]), ("checkpoint-3", [2.0])):
        resumed = make_trainer(tmp_path, tiny_model_dir, tokenizer, **kwargs)
        resumed.train(resume_from_checkpoint=str(tmp_path / checkpoint))
        first = int(checkpoint.split("-")[1]) + 1
        logged = [(h["step"], h["stage"]) for h in resumed.state.log_history if "loss" in h and h["step"] >= first]
        assert logged == list(zip(range(first, 5), expected, strict=True))


@pytest.mark.parametrize("num_attempts", [2, 3], ids=["two_attempts", "three_attempts"])
def test_truncation_mask_accumulation_iterations_and_eval(tmp_path, tiny_model_dir, tokenizer, num_attempts):
    trainer = SCoReTrainer(
        tiny_model_dir,
        reward_funcs=letter_reward,
        args=make_args(
            tmp_path,
            max_completion_length=3,
            mask_truncated_completions=True,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            steps_per_generation=2,
            num_iterations=2,
            stage_one_steps=2,
            max_steps=4,
            eval_strategy="steps",
            eval_steps=2,
            per_device_eval_batch_size=2,
            num_attempts=num_attempts,
            log_completions=True,
        ),
        train_dataset=toy_dataset(16),
        eval_dataset=toy_dataset(4),
        processing_class=tokenizer,
    )
    # A truncated attempt stays in the context (attended) but leaves the loss; an attempt that ended on EOS stays
    eos = tokenizer.eos_token_id
    attempts = [[[10, 11, 12], [10, eos]], [[13, eos], [14, 15, 16]], [[17, 18, 19], [eos]]][:num_attempts]
    layout = trainer._training_layout([[2, 9], [2, 9]], attempts, [[[7], [7]], [[8], [8]]][: num_attempts - 1])
    # row 0: y1 = 10 11 12 (truncated) | 7 | y2 = 13 EOS (| 8 | y3 = 17 18 19, truncated)
    # row 1: y1 = 10 EOS | 7 | y2 = 14 15 16 (truncated) (| 8 | y3 = EOS)
    if num_attempts == 2:
        assert layout["completion_mask"].tolist() == [[1] * 6, [1] * 6]
        assert layout["turn_ids"].tolist() == [[0, 0, 0, 0, 2, 2], [1, 1, 0, 0, 0, 0]]
    else:
        assert layout["completion_mask"].tolist() == [[1] * 10, [1] * 8 + [0, 0]]
        assert layout["turn_ids"].tolist() == [[0, 0, 0, 0, 2, 2, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 3, 0, 0]]
    trainer.train()
    history = trainer.state.log_history
    train_logs = [h for h in history if "loss" in h]
    assert [h["stage"] for h in train_logs] == [1.0, 1.0, 2.0, 2.0]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert len(eval_logs) == 2 and all("eval_turn2/reward" in h and "eval_stage" in h for h in eval_logs)
    keys = [f"accuracy_t{t}" for t in range(1, num_attempts + 1)] + ["delta", "incorrect_to_correct"]
    keys += ["correct_to_incorrect_t2_t3", f"eval_turn{num_attempts}/reward"] if num_attempts == 3 else []
    for key in keys:
        assert all((key if key.startswith("eval_") else f"eval_self_correction/{key}") in h for h in eval_logs), key
    # The completions table shows every attempt with its reward and advantage
    assert {f"{c}_{t}" for c in ("attempt", "reward", "advantage") for t in range(1, num_attempts + 1)} <= set(
        trainer._attempt_logs
    )


def test_merged_copy_is_the_policy_and_follows_each_step(tmp_path, tiny_model_dir, tokenizer):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, max_steps=2, **BACKENDS["merged"])
    trainer.train()
    copy, policy = trainer._merged, trainer.model.eval()
    assert copy.synced_step == 1  # the second step sampled after the first optimizer step
    copy.sync(policy, step=2)  # the weights after the last step
    ids = torch.tensor([tokenizer.encode("Say the word cat. The word is cat.")])
    with torch.no_grad():
        torch.testing.assert_close(copy.model(ids).logits, policy(ids).logits, atol=1e-5, rtol=1e-5)
        trained = [n for n, p in policy.named_parameters() if "lora_B" in n]
        assert trained and not any(hasattr(module, "lora_A") for module in copy.model.modules())

    with pytest.raises(ValueError, match="generation_weights='merged' merges a LoRA adapter.*peft_config"):
        make_trainer(tmp_path, tiny_model_dir, tokenizer, generation_weights="merged")
    with pytest.raises(ValueError, match="does not combine with use_vllm or use_transformers_continuous_batching"):
        make_trainer(tmp_path, tiny_model_dir, tokenizer, use_transformers_continuous_batching=True,
                     **BACKENDS["merged"])  # fmt: skip
