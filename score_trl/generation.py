"""Generators for evaluation: callables from prompt token ids to completion token ids, and the multi-attempt rollout
built on them with the correction turn spliced in as token ids, exactly as in training (`score_trl.turns`)."""

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers import GenerationConfig
from transformers.generation import ContinuousBatchingConfig
from trl.trainer.utils import pad

from .models import id_list
from .turns import find_turn_bridge, next_attempt_prompts


Generator = Callable[[list[list[int]]], list[list[int]]]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the model's generation EOS ids plus the tokenizer's EOS (as RLOOTrainer does)."""
    ids = id_list(model.generation_config.eos_token_id)
    return ids if tokenizer.eos_token_id in ids else [tokenizer.eos_token_id, *ids]


class TransformersGenerator:
    """Greedy or sampled generation with transformers: padded `generate`, or continuous batching (`generate_batch`).
    The model samples in eval mode (no dropout) and is put back in the mode it was in. Sampling draws from the whole
    temperature-scaled distribution by default (`top_p=1.0, top_k=0`), as RLOOTrainer's defaults and vLLM do. With
    `stop_strings` (base models), each attempt is cut as training cuts it (`cut_at_stop_strings`)."""

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens=256,
        do_sample=False,
        temperature=1.0,
        continuous=False,
        top_p=1.0,
        top_k=0,
        stop_strings=None,
    ):
        self.model, self.tokenizer, self.continuous = model, tokenizer, continuous
        self.stop_strings = stop_strings
        self.stop_ids = eos_token_ids(model, tokenizer)
        self.config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            # Set, not None: generate() fills a None with transformers' global default top_k=50, which would sample a
            # truncated distribution that training (RLOO's top_k=0) never samples
            top_p=top_p if do_sample else None,
            top_k=top_k if do_sample else None,
            eos_token_id=self.stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )

    @torch.no_grad()
    def __call__(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        was_training = self.model.training
        self.model.eval()
        try:
            rows = self._continuous(prompt_ids) if self.continuous else self._padded(prompt_ids)
        finally:
            self.model.train(was_training)
        rows = cut_at_stop([list(row) for row in rows], self.stop_ids)
        return cut_at_stop_strings(rows, self.tokenizer, self.stop_strings)

    def _continuous(self, prompt_ids):
        on_cpu = self.model.device.type == "cpu"
        sized = cpu_cache_config(None, prompt_ids, self.config.max_new_tokens) if on_cpu else None
        outputs = self.model.generate_batch(
            prompt_ids, generation_config=self.config, continuous_batching_config=sized, progress_bar=False
        )
        return [outputs[key].generated_tokens for key in outputs]

    def _padded(self, prompt_ids):
        return sample_padded(self.model, prompt_ids, self.config, self.tokenizer.pad_token_id)


# transformers sizes a continuous-batching KV cache from the device's free memory. On CPU that is the machine's RAM,
# allocated on every call (TRL's training default takes half of it, transformers' own 90%): six tokens of the tests'
# tiny model took 25-35 s per call on a 24 GB machine, against 1.5 s with the cache sized for the call (both beside a
# training run; docs/benchmarks.md has SmolLM2's figures). So on CPU it is sized for each call: every request's prompt
# and new tokens, in whole pages.


def cache_blocks(
    prompt_lengths: list[int], max_new_tokens: int, page_size: int = ContinuousBatchingConfig.page_size
) -> int:
    """Cache blocks (pages of `page_size` tokens) that hold every request at once: prompt plus new tokens each."""
    return sum(math.ceil((length + max_new_tokens) / page_size) for length in prompt_lengths)


def cpu_cache_config(settings: dict | None, prompt_ids: list[list[int]], max_new_tokens: int):
    """`settings` (TRL's `transformers_continuous_batching_config`) with `num_blocks` sized for this call, unless they
    set it."""
    kwargs = dict(settings or {})
    if kwargs.get("num_blocks") is None:
        page_size = kwargs.get("page_size") or ContinuousBatchingConfig.page_size
        kwargs["num_blocks"] = cache_blocks([len(p) for p in prompt_ids], max_new_tokens, page_size)
    return ContinuousBatchingConfig(**kwargs)


def sample_padded(model, prompt_ids, generation_config, pad_token_id, pad_to_multiple_of=None) -> list[list[int]]:
    """`generate` on left-padded prompts; the new tokens of each row (cut at the first EOS by the caller)."""
    prompts = [torch.tensor(p) for p in prompt_ids]
    input_ids = pad(prompts, pad_token_id, "left", pad_to_multiple_of).to(model.device)
    attention_mask = pad([torch.ones_like(p) for p in prompts], 0, "left", pad_to_multiple_of).to(model.device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
    return output[:, input_ids.size(1) :].tolist()


def cut_at_stop_strings(rows: list[list[int]], tokenizer, stop_strings) -> list[list[int]]:
    """Each row up to and including the token that completes the first occurrence of a stop string in its decoded
    text (all of it when none occurs). The kept tokens are a prefix of what was sampled, so their log-probs are
    unchanged; generation may have run past the stop, which costs time but changes nothing trained."""
    if not stop_strings:
        return rows
    out = []
    for row in rows:
        if not stops_in(tokenizer.decode(row, skip_special_tokens=True), stop_strings):
            out.append(row)
            continue
        # A prefix that holds a stop string stays holding it, so the shortest one is found by bisection
        low, high = 1, len(row)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if stops_in(tokenizer.decode(row[:mid], skip_special_tokens=True),
                                               stop_strings) else (mid + 1, high)  # fmt: skip
        out.append(row[:low])
    return out


def stops_in(text: str, stop_strings) -> bool:
    """Whether `text` contains one of `stop_strings` (an attempt cut at one ends with it: it finished)."""
    return bool(stop_strings) and any(stop in text for stop in stop_strings)


def cut_at_stop(rows: list[list[int]], stop_ids) -> list[list[int]]:
    """Each row up to and including its first stop token (all of it when none), as RLOOTrainer keeps completions."""
    stops = set(stop_ids)
    return [row[: next((i + 1 for i, token in enumerate(row) if token in stops), len(row))] for row in rows]


class VLLMGenerator:
    """Generation with vLLM from token ids (prompts are never re-tokenized, as in training)."""

    def __init__(self, llm, max_new_tokens=256, do_sample=False, temperature=1.0, stop_strings=None):
        from vllm import SamplingParams

        self.llm, self.stop_strings = llm, stop_strings
        self.params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0)

    def __call__(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompt_ids], self.params, use_tqdm=False
        )
        rows = [list(output.outputs[0].token_ids) for output in outputs]
        return cut_at_stop_strings(rows, self.llm.get_tokenizer(), self.stop_strings)


def roll_out(generate, context_ids: list[list[int]], bridges, num_attempts: int):
    """The attempt loop, one for training and evaluation: attempt t is `generate(t, context_ids)`; the next context is
    the previous one, the attempt and its correction turn, token for token (`turns.next_attempt_prompts`). `bridges`
    is each row's `TurnBridge`, or `bridges(t, attempt_ids)` giving them after attempt t (when the turn carries
    feedback on that attempt, `feedback.CorrectionTurns`). Returns (attempts[t][i], appended[t][i]: the
    correction-turn ids after attempt t)."""
    attempts, appended = [], []
    for t in range(num_attempts):
        attempts.append(generate(t, context_ids))
        if t + 1 < num_attempts:
            after = bridges(t, attempts[-1]) if callable(bridges) else bridges
            added, context_ids = next_attempt_prompts(context_ids, attempts[-1], after)
            appended.append(added)
    return attempts, appended


def generate_attempts(
    generator: Generator,
    tokenizer,
    prompts: list[list[dict]],
    instructions: list[str],
    chat_template_kwargs: dict | None = None,
    num_attempts: int = 2,
) -> list[list[list[int]]]:
    """`num_attempts` attempts (token ids) for a batch of conversational prompts with the instruction alone in each
    correction turn (no feedback; `evaluation.evaluate` handles feedback). Returns `attempts[t][i]`."""
    kwargs = chat_template_kwargs or {}
    bridges = {text: find_turn_bridge(tokenizer, text, kwargs) for text in set(instructions)}
    attempts, _ = roll_out(lambda t, ids: generator(ids), prompt_ids(tokenizer, prompts, kwargs),
                           [bridges[text] for text in instructions], num_attempts)  # fmt: skip
    return attempts


def prompt_ids(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Prompt ids as RLOOTrainer makes them: conversational prompts rendered with the template and its generation
    prompt; plain-text prompts tokenized as they are (with the tokenizer's special tokens, e.g. a BOS)."""
    if prompts and isinstance(prompts[0], str):
        return tokenizer(text=prompts)["input_ids"]
    return tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
    )["input_ids"]


# The trainer's side of the attempt loop: how SCoReTrainer generates attempts on RLOO's backends


@contextmanager
def one_generation_per_row(trainer):
    """After the first attempt every row has its own context, so each row gets exactly one sample. vLLM's server
    mode otherwise keeps every num_generations-th prompt and samples num_generations from it."""
    saved = trainer.num_generations, trainer.num_generations_eval
    trainer.num_generations = trainer.num_generations_eval = 1
    try:
        yield
    finally:
        trainer.num_generations, trainer.num_generations_eval = saved


def first_attempts(trainer, prompt_ids, given: list[str | None]) -> list[list[int]]:
    """y1 ids: the given text tokenized as the model's turn where a row has one, sampled elsewhere."""
    tokenize = trainer._tokenizer
    encoded = {i: tokenize(text, add_special_tokens=False)["input_ids"] for i, text in enumerate(given) if text}
    todo = [i for i in range(len(given)) if i not in encoded]
    # vLLM, DeepSpeed and FSDP generation are collective across processes (gathers, weight summons): every rank
    # must generate the same way, so those backends sample every row and discard the given ones.
    if trainer.use_vllm or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        sampled = trainer._generate_single_turn(prompt_ids, None, {})
    elif todo:
        completions = trainer._generate_single_turn([prompt_ids[i] for i in todo], None, {})
        sampled = dict(zip(todo, completions, strict=True))
    else:
        sampled = {}
    return [encoded[i] if i in encoded else sampled[i] for i in range(len(given))]
