"""Bad input stops before training, with a message naming the field and the fix."""

import pytest
from datasets import Dataset

from score_trl import SCoReConfig, SCoReTrainer

from conftest import toy_dataset, word_reward


def config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4
    )
    return SCoReConfig(**{**defaults, **kwargs})


def test_paper_defaults(tmp_path):
    args = config(tmp_path)
    assert (args.alpha, args.beta, args.beta2, args.learning_rate, args.temperature) == (10.0, 0.01, 0.1, 5e-6, 1.0)
    assert args.correction_instruction is None  # per-row column, else the paper's MATH instruction
    for name in ("alpha", "beta2", "stage_one_steps", "correction_instruction", "correct_threshold", "beta"):
        assert SCoReConfig.__dataclass_fields__[name].metadata["help"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_generations=1), "num_generations=1.*at least 2"),
        (dict(alpha=-1.0), "alpha=-1.0 is negative"),
        (dict(beta2=-0.1), "beta2=-0.1 is negative"),
        (dict(beta=-0.1), "beta=-0.1 is negative"),
        (dict(stage_one_steps=-3), "stage_one_steps=-3 is negative"),
        (dict(beta=0.0, beta2=0.1, stage_one_steps=5), "beta=0 makes RLOOTrainer skip the reference model"),
        (dict(correction_instruction="  "), "correction_instruction is empty"),
        (dict(compile_generation=True), "compile_generation=True with cache_implementation=None.*'static'"),
        (dict(reward_timeout=-1.0), "reward_timeout=-1.0: give seconds > 0"),
        (dict(preemption_signals=["SIGTERM", "SIGNOPE"]), r"\['SIGNOPE'\] are not signal names"),
        (
            dict(gradient_accumulation_steps=1, steps_per_generation=2, stage_one_steps=3),
            "stage_one_steps=3 does not fall on a generation boundary.*every 2 steps: set stage_one_steps=2 or 4",
        ),
        (
            dict(gradient_accumulation_steps=3, steps_per_generation=4, num_iterations=2, stage_one_steps=100),
            "every 8 steps: set stage_one_steps=96 or 104",  # TRL's own test_prepare_input_called_with_correct_data
        ),
        (
            dict(gradient_accumulation_steps=1, steps_per_generation=4, stage_one_steps=3),
            "every 4 steps: set stage_one_steps=4 ",
        ),
    ],
)
def test_config_rejects_nonsense(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


def test_config_accepts_edges(tmp_path):
    assert config(tmp_path, beta=0.0, beta2=0.0).beta == 0.0  # no KL at all: no reference needed
    assert config(tmp_path, beta=0.0, stage_one_steps=0).stage_one_steps == 0  # Stage II only, beta2 unused
    assert config(tmp_path, gradient_accumulation_steps=2, steps_per_generation=4, stage_one_steps=4).stage_one_steps


def build(tmp_path, tiny_model_dir, tokenizer, dataset=None, **kwargs):
    return SCoReTrainer(
        tiny_model_dir,
        reward_funcs=word_reward,
        args=config(tmp_path, **kwargs),
        train_dataset=dataset if dataset is not None else toy_dataset(4),
        processing_class=tokenizer,
    )


def test_missing_prompt_column(tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(
        ValueError,
        match=r"train_dataset has no 'prompt' column \(columns: \['question'\]\).*plain-text one for a base model",
    ):
        build(tmp_path, tiny_model_dir, tokenizer, Dataset.from_dict({"question": ["a"] * 4}))


def test_plain_text_prompts_need_no_chat_template(tmp_path, tiny_model_dir, tokenizer):
    # Strings are TRL's standard format (base models): the correction is appended as text, so no template is needed
    tokenizer.chat_template = None
    plain = Dataset.from_dict({"prompt": ["Say red."] * 4, "answer": ["red"] * 4})

    def text_reward(completions, answer, **kwargs):  # plain-text prompts get string completions
        return [float(a in c) for c, a in zip(completions, answer, strict=True)]

    trainer = SCoReTrainer(tiny_model_dir, reward_funcs=text_reward, args=config(tmp_path), train_dataset=plain,
                           processing_class=tokenizer)  # fmt: skip
    assert trainer.train_dataset[0]["prompt"] == "Say red."
    with pytest.raises(ValueError, match="'prompt' must be conversational .* or a string"):
        build(tmp_path, tiny_model_dir, tokenizer, Dataset.from_dict({"prompt": [1] * 4, "answer": ["red"] * 4}))


def test_system_message_with_gemma_template(tmp_path, tiny_model_dir, tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say red."}]
    with pytest.raises(ValueError, match="fold the system text into the first user turn"):
        build(tmp_path, tiny_model_dir, tokenizer, Dataset.from_dict({"prompt": [prompt] * 4}))


def test_tokenizer_without_chat_template(tmp_path, tiny_model_dir, tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="Set `tokenizer.chat_template`"):
        build(tmp_path, tiny_model_dir, tokenizer)


def test_tokenizer_without_pad_token(tmp_path, tiny_model_dir, tokenizer):
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        build(tmp_path, tiny_model_dir, tokenizer)


def test_wrong_config_type(tmp_path, tiny_model_dir, tokenizer):
    from trl import RLOOConfig

    with pytest.raises(TypeError, match="must be a SCoReConfig"):
        SCoReTrainer(
            tiny_model_dir,
            reward_funcs=word_reward,
            args=RLOOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
            train_dataset=toy_dataset(4),
            processing_class=tokenizer,
        )
