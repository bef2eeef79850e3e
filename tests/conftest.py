"""Shared test helpers: a tiny Gemma2 model and a locally trained tokenizer with Gemma's chat template (built once per
session), toy data and rewards, and SCoReTrainer/SCoReConfig builders."""

import os
from pathlib import Path

import pytest
import torch
import trl
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

from score_trl import MATH_CORRECTION_INSTRUCTION, SCoReConfig, SCoReTrainer


os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# TRL ships Gemma's chat template (no system role, assistant content trimmed); read from the installed package.
GEMMA_TEMPLATE = (Path(trl.__file__).parent / "chat_templates" / "gemma.jinja").read_text()
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TOY_WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "one", "two", "three", "four", "five"]


def toy_question(word: str) -> str:
    return f"Say the word {word}."


def toy_corpus() -> list[str]:
    lines = [MATH_CORRECTION_INSTRUCTION, "user", "model", "Question?", "SCoReSentinelAnswer", "Final Answer: 42"]
    for w in TOY_WORDS:
        lines += [toy_question(w), f"The word is {w}.", f"{w} {w} {w}", "é ü ñ 日本 ∑ ≥ π"]
    lines += [" ".join(str(i) for i in range(100)), "What is 2 + 3? The answer is 5. #### 5"]
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(toy_corpus() * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        padding_side="left",
        truncation_side="left",
    )
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def build_model(tokenizer, head_dim: int = 16) -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=2048,
        sliding_window=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-gemma2")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def toy_dataset(n: int = 8) -> Dataset:
    words = [TOY_WORDS[i % len(TOY_WORDS)] for i in range(n)]
    return Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": toy_question(w)}] for w in words], "answer": words}
    )


def word_reward(completions, answer, **kwargs):
    """1.0 when the completion contains the answer word, else 0.0 (TRL reward signature)."""
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer, strict=True)]


def letter_reward(completions, **kwargs):
    """Share of letters in the completion: a dense reward, so every group has a learning signal."""
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isalpha() for ch in t) / max(len(t), 1) for t in texts]


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        stage_one_steps=1,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
    )
    return SCoReConfig(**{**defaults, **kwargs})


def make_trainer(tmp_path, model, tokenizer, reward=letter_reward, n=8, **kwargs):
    peft_config = kwargs.pop("peft_config", None)
    return SCoReTrainer(
        model,
        reward_funcs=reward,
        args=make_args(tmp_path, **kwargs),
        train_dataset=toy_dataset(n),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def grouped_inputs(trainer, words=("cat", "green")):
    rows = [{"prompt": [{"role": "user", "content": toy_question(w)}], "answer": w} for w in words]
    return [row for row in rows for _ in range(trainer.num_generations)]
