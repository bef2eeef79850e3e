"""Run TRL's own RLOOTrainer tests against SCoReTrainer, offline, and list what passes and what fails.

    python scripts/trl_rloo_suite.py --tests path/to/trl/tests/test_rloo_trainer.py [--conversational] [--out DIR]
    python scripts/trl_rloo_suite.py --tests ... --conversational --trainer rloo   # the control: TRL's own trainer

TRL's test file is not shipped in its wheel or sdist and is not part of this repository: pass the one from a TRL
source checkout (tag v1.16.0). The script copies it into a scratch package beside a small `testing_utils` stand-in,
and runs it with pytest after swapping, inside the test module only:
- `RLOOTrainer` -> `SCoReTrainer` and `RLOOConfig` -> `SCoReConfig` (SCoRe's own defaults; `bf16` is off without a
  bf16 GPU, as SCoReConfig does),
- the hub models `trl-internal-testing/tiny-*` -> tiny random models of the same classes built here from their
  configs, with this project's test tokenizer and the family's chat template from `trl/chat_templates`,
- `load_dataset("trl-internal-testing/zen", ...)` -> the Zen of Python prompts in the same two configurations; with
  `--conversational`, the standard (plain-string) configuration is served as conversational prompts too, so that the
  rest of each test runs under SCoRe's conversational-only contract, and the suite's reward functions, written for
  strings (`len(completion)`, `set(completion)`), get each completion's text (which still answers
  `completion[0]["content"]`).
With `--trainer rloo` nothing but the models and the dataset is swapped: TRL's own RLOOTrainer runs the same
modified suite, so a test that fails there too fails because of the stand-ins or the conversational prompts (reward
functions written for strings), not because of SCoRe. Vision tests are skipped (SCoRe is text-only), as are tests TRL
itself skips (vLLM). Writes junit.xml and summary.md (one row per test: outcome and the first line of its failure) to
--out.
"""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

TESTING_UTILS = """
import tempfile

import pytest
from transformers.utils import is_peft_available


class TrlTestCase:
    @pytest.fixture(autouse=True)
    def _tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)


require_peft = pytest.mark.skipif(not is_peft_available(), reason="needs peft")
require_vision = pytest.mark.skip(reason="vision: SCoReTrainer is text-only")
require_vllm = pytest.mark.skip(reason="needs vLLM and a GPU")
"""

CONFTEST = """
import functools
import inspect
import sys

import pytest
import torch
from trl import RLOOConfig, RLOOTrainer

sys.path.insert(0, {root!r})
from scripts.trl_rloo_suite import build_standins, zen_dataset  # noqa: E402

CONVERSATIONAL = {conversational!r}
SWAP_TRAINER = {swap_trainer!r}


class CPURLOOConfig(RLOOConfig):
    # RLOO's own config for the control, with bf16 off where there is no bf16 GPU (as SCoReConfig does)
    def __post_init__(self):
        from score_trl.config import _bf16_device_available

        if self.bf16 is None and not self.fp16 and not _bf16_device_available(self.use_cpu):
            self.bf16 = False
        super().__post_init__()


class TextCompletion(str):
    # A conversational completion as its text, for reward functions the suite writes for strings (len, set); it still
    # answers completion[0]["content"] like the message list it stands for
    def __getitem__(self, key):
        return {{"role": "assistant", "content": str(self)}} if key == 0 else super().__getitem__(key)


def _as_text(completions):
    return [
        TextCompletion("".join(m["content"] for m in c if isinstance(m.get("content"), str))) if isinstance(c, list)
        else c
        for c in completions
    ]


def _text_reward(func):
    if not callable(func) or isinstance(func, torch.nn.Module):
        return func
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def wrapper(*args, completions, **kwargs):
            return await func(*args, completions=_as_text(completions), **kwargs)
    else:
        @functools.wraps(func)
        def wrapper(*args, completions, **kwargs):
            return func(*args, completions=_as_text(completions), **kwargs)
    return wrapper


def text_rewards(trainer_class):
    # The trainer under test, with reward functions that get conversational completions as text
    class Trainer(trainer_class):
        def __init__(self, *args, reward_funcs=None, **kwargs):
            if isinstance(reward_funcs, list):
                reward_funcs = [_text_reward(f) for f in reward_funcs]
            else:
                reward_funcs = _text_reward(reward_funcs)
            super().__init__(*args, reward_funcs=reward_funcs, **kwargs)

    Trainer.__name__ = Trainer.__qualname__ = trainer_class.__name__
    return Trainer


@pytest.fixture(autouse=True, scope="session")
def _standins(tmp_path_factory):
    build_standins()


@pytest.fixture(autouse=True)
def _swap(monkeypatch):
    import trl.trainer.rloo_trainer
    from score_trl import SCoReConfig, SCoReTrainer

    import suite.test_rloo_trainer as module

    monkeypatch.setattr(module, "load_dataset", lambda *a, **k: zen_dataset(*a, conversational=CONVERSATIONAL, **k))
    trainer = SCoReTrainer if SWAP_TRAINER else RLOOTrainer
    monkeypatch.setattr(module, "RLOOTrainer", text_rewards(trainer) if CONVERSATIONAL else trainer)
    if SWAP_TRAINER:
        monkeypatch.setattr(module, "RLOOConfig", SCoReConfig)
    else:
        monkeypatch.setattr(module, "RLOOConfig", CPURLOOConfig)
        monkeypatch.setattr(trl.trainer.rloo_trainer, "RLOOConfig", CPURLOOConfig)
"""

# Zen of Python prompts, cut as in TRL's zen dataset (the first twelve are the ones its ordering test expects)
ZEN = [
    "Beautiful is better than", "Explicit is", "Simple is better", "Complex", "Flat is better than",
    "Sparse is better", "Readability", "Special cases aren't special", "Although practicality beats",
    "Errors should never", "Unless explicitly", "In the face of ambiguity, refuse",
    "There should be one-- and preferably", "Although that way may not be", "Now is better than",
    "Although never is often better than", "If the implementation is hard to explain, it's",
]  # fmt: skip
ZEN_TEST = ["If the implementation is easy to explain, it may", "Namespaces are one honking great"]

# Hub id -> (model class, config class, chat template); built small and random
MODELS = {
    "tiny-Qwen2ForCausalLM-2.5": ("Qwen2ForCausalLM", "Qwen2Config", "qwen2_5"),
    "tiny-Qwen2ForSequenceClassification-2.5": ("Qwen2ForSequenceClassification", "Qwen2Config", "qwen2_5"),
    "tiny-Qwen3ForCausalLM": ("Qwen3ForCausalLM", "Qwen3Config", "qwen3"),
    "tiny-Qwen3ForSequenceClassification": ("Qwen3ForSequenceClassification", "Qwen3Config", "qwen3"),
    "tiny-LlamaForSequenceClassification-3.2": ("LlamaForSequenceClassification", "LlamaConfig", "llama3_2"),
    "tiny-Cohere2ForCausalLM": ("Cohere2ForCausalLM", "Cohere2Config", "cohere2"),
    "tiny-Glm4MoeForCausalLM": ("Glm4MoeForCausalLM", "Glm4MoeConfig", "glm4moe"),
    "tiny-GptOssForCausalLM": ("GptOssForCausalLM", "GptOssConfig", "gptoss"),
    "tiny-Qwen3MoeForCausalLM": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", "qwen3"),
    "tiny-NemotronHForCausalLM-nano": ("NemotronHForCausalLM", "NemotronHConfig", "nemotron_3_nano"),
}
SIZES = dict(
    hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=4, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=0, max_position_embeddings=512,
)  # fmt: skip


def zen_dataset(name, config_name=None, split=None, conversational=False, **kwargs):
    from datasets import Dataset, DatasetDict

    if name != "trl-internal-testing/zen":
        raise ValueError(f"No local stand-in for the dataset {name!r}")

    def rows(prompts):
        if config_name == "conversational_prompt_only" or conversational:
            return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
        return Dataset.from_dict({"prompt": prompts})

    splits = DatasetDict(train=rows(ZEN), test=rows(ZEN_TEST))
    return splits[split] if split else splits


def build_standins(root: Path = Path("trl-internal-testing")):
    """Tiny random models under ./trl-internal-testing/<name>, where transformers looks before the hub."""
    import re

    import torch
    import transformers
    import trl

    # The project's test tokenizer (tests/conftest.py), loaded under its own name: the suite has a conftest too
    spec = importlib.util.spec_from_file_location("score_test_fixtures", ROOT / "tests" / "conftest.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    build_tokenizer = fixtures.build_tokenizer

    special = re.compile(r"<\|[^<>\s|]+\|>|<｜[^<>]+?｜>|<\|?[A-Za-z_]+\|?>|</[a-z]+>|\[gMASK\]")
    for name, (model_class, config_class, template) in MODELS.items():
        path = root / name
        if (path / "config.json").is_file():
            continue
        tokenizer = build_tokenizer()
        tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / f"{template}.jinja").read_text()
        messages = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "SCoReAnswer"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        markers = sorted(set(special.findall(text)) - set(tokenizer.all_special_tokens))
        extra = ["<|finetune_right_pad_id|>"] if "Llama" in model_class else []  # the pad token TRL's test sets
        tokenizer.add_special_tokens(
            {"additional_special_tokens": markers + extra}, replace_extra_special_tokens=False
        )
        closing = special.findall(text.split("b", 1)[-1]) or markers[-1:]
        tokenizer.eos_token = closing[0]
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, num_labels=1, **SIZES,
        )  # fmt: skip
        try:
            torch.manual_seed(0)
            model = getattr(transformers, model_class)(config)
        except Exception as err:  # an architecture this transformers cannot build small: its tests report it
            print(f"[stand-ins] {name}: not built ({type(err).__name__}: {err})")
            continue
        if getattr(model, "generation_config", None) is not None:  # causal LMs; classifiers have none
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)


def summarize(junit: Path) -> str:
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (element.get("message") or element.text or "").strip().splitlines()
                detail = message[0][:160] if message else ""
                break
        rows.append((case.get("name"), outcome, detail.replace("|", "\\|")))
    counts = {o: sum(r[1] == o for r in rows) for o in ("passed", "failed", "error", "skipped")}
    lines = [", ".join(f"{v} {k}" for k, v in counts.items()), "", "| test | outcome | first line |", "|---|---|---|"]
    lines += [f"| {name} | {outcome} | {detail} |" for name, outcome, detail in rows]
    return "\n".join(lines) + "\n"


def header(args) -> str:
    import platform
    import time
    from importlib.metadata import version

    trainer = "SCoReTrainer" if args.trainer == "score" else "TRL's own RLOOTrainer (the control)"
    prompts = "standard prompts served as conversational" if args.conversational else "prompts as the suite has them"
    versions = ", ".join(f"{p} {version(p)}" for p in ("trl", "transformers", "peft", "torch"))
    return (
        f"# TRL's RLOOTrainer tests against {trainer}, {prompts}\n\n"
        f"`python scripts/trl_rloo_suite.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M %Z')}; "
        f"{versions}; {platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores\n\n"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", required=True, help="TRL's tests/test_rloo_trainer.py")
    parser.add_argument("--conversational", action="store_true", help="serve standard prompts as conversational")
    parser.add_argument(
        "--trainer", choices=("score", "rloo"), default="score", help="rloo: TRL's own trainer (the control)"
    )
    parser.add_argument("--out", default="outputs/trl_rloo_suite", help="where junit.xml and summary.md go")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. -k peft)")
    args = parser.parse_args()

    work = Path(args.out).resolve()
    (work / "suite").mkdir(parents=True, exist_ok=True)
    shutil.copy(args.tests, work / "suite" / "test_rloo_trainer.py")
    (work / "suite" / "__init__.py").write_text("")
    (work / "suite" / "testing_utils.py").write_text(TESTING_UTILS)
    (work / "conftest.py").write_text(
        CONFTEST.format(root=str(ROOT), conversational=args.conversational, swap_trainer=args.trainer == "score")
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", "junit.xml", "suite"]
    subprocess.run(command + args.pytest_args, cwd=work, check=False)
    summary = header(args) + summarize(work / "junit.xml")
    (work / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
