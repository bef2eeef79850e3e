"""The correction turn for every chat template TRL ships (`trl/chat_templates/*.jinja`), one case per file, so a new
template in a TRL release shows up here as a passing or failing case. Vision templates are skipped (SCoRe is
text-only).

Per template, with a small local tokenizer that knows the template's turn tokens as special tokens, the turn-2
prompt is built from token ids (prompt + sampled first attempt + `TurnBridge.after`), for a first attempt that stopped
on the template's own stop token and for one that was truncated, and checked against the template itself:
- the sampled tokens are kept as sampled, and what follows them is, as text, the template's own closing, instruction
  turn and generation prompt (one stop token, never two);
- where the template is prefix-stable, the ids equal the tokenized rendering of the whole conversation;
- no turn token is doubled where the template's rendering has it once (GLM-4's `<|user|><|user|>`);
- thinking templates honour `enable_thinking`.
"""

import re
from pathlib import Path

import pytest
import trl

from score_trl.turns import find_turn_bridge

from conftest import build_tokenizer


TEMPLATE_DIR = Path(trl.__file__).parent / "chat_templates"
TEMPLATES = sorted(TEMPLATE_DIR.glob("*.jinja"))
VISION = ("vl", "idefics", "llava", "smolvlm")
# Turn markers in the renderings: <|im_start|>, <｜User｜>, <start_of_turn>, <|turn>, <turn|>, </think>, [gMASK], ...
SPECIAL = re.compile(r"<\|[^<>\s|]+\|>|<｜[^<>]+?｜>|<\|?[A-Za-z_]+\|?>|</[a-z]+>|\[gMASK\]")
INSTRUCTION = "There might be an error in the answer above. Correct it."
ANSWER = "The answer is 5."
USER = {"role": "user", "content": "What is 2 + 3?"}


def test_every_template_file_is_listed():
    assert len(TEMPLATES) > 40  # TRL 1.16 ships 73; a moved folder must not silently empty the parametrization


def render(tokenizer, messages, generation_prompt, kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def template_tokenizer(path: Path, kwargs: dict):
    """The test tokenizer with this template and its turn markers registered as special tokens."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = path.read_text()
    conversation = [USER, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": INSTRUCTION}]
    text = render(tokenizer, conversation, True, kwargs) + render(tokenizer, conversation[:2], False, kwargs)
    markers = sorted(set(SPECIAL.findall(text)) - set(tokenizer.all_special_tokens))
    tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    return tokenizer


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cases():
    for path in TEMPLATES:
        thinking = "enable_thinking" in path.read_text()
        for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}) if thinking else ({},):
            marks = [pytest.mark.skip(reason="vision template")] if any(v in path.stem for v in VISION) else []
            label = path.stem + "".join(f"-{k}={v}" for k, v in kwargs.items())
            yield pytest.param(path, kwargs, id=label, marks=marks)


@pytest.mark.parametrize("path, kwargs", list(cases()))
@pytest.mark.parametrize("ending", ["stop", "truncated"])
def test_correction_turn_follows_the_template(path, kwargs, ending):
    tokenizer = template_tokenizer(path, kwargs)
    bridge = find_turn_bridge(tokenizer, INSTRUCTION, kwargs)

    prompt_text = render(tokenizer, [USER], True, kwargs)
    answered = render(tokenizer, [USER, {"role": "assistant", "content": ANSWER}], False, kwargs)
    full = [USER, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": INSTRUCTION}]
    full_text = render(tokenizer, full, True, kwargs)
    # The template's own text after an answered turn: closing, instruction turn, generation prompt
    after_answer = full_text.split(ANSWER, 1)[1]
    # The stop token a model trained on this template samples: what the template closes a final answer with (gpt-oss:
    # <|return|>), else what follows the answer in the conversation (GLM-4: the next turn's <|user|>)
    close_markers = SPECIAL.findall(answered.split(ANSWER, 1)[1]) or SPECIAL.findall(after_answer)
    stop = close_markers[0]

    prompt_ids = encode(tokenizer, prompt_text)
    completion = encode(tokenizer, ANSWER) + (tokenizer.convert_tokens_to_ids([stop]) if ending == "stop" else [])
    appended = bridge.after(completion)
    built = prompt_ids + completion + appended

    # Sampled tokens kept; then, as text, the template's own turns, the stop token appearing once
    text = tokenizer.decode(appended, skip_special_tokens=False)
    if ending == "stop" and after_answer.startswith(stop):
        assert stop + text == after_answer
    elif ending == "stop":  # a stop token the template does not repeat in history (gpt-oss's <|return|>)
        assert text == after_answer and not text.startswith(stop)
    else:
        assert text == after_answer
    assert text.count(INSTRUCTION) == 1
    assert text.endswith(render(tokenizer, full, True, kwargs)[len(render(tokenizer, full, False, kwargs)) :])

    # Prefix-stable templates: exactly the template's rendering of the whole conversation
    if not bridge.rerenders and (ending == "truncated" or after_answer.startswith(stop)):
        assert built == encode(tokenizer, full_text)

    # No turn token doubled where the template has it once
    specials = bridge.special_ids
    reference = encode(tokenizer, full_text)
    reference_pairs = {(a, b) for a, b in zip(reference, reference[1:], strict=False) if a == b}
    pairs = zip(built, built[1:], strict=False)
    doubled = [(a, b) for a, b in pairs if a == b and a in specials and (a, b) not in reference_pairs]
    assert not doubled, tokenizer.decode(built, skip_special_tokens=False)


def test_glm4_stop_token_is_not_doubled():
    tokenizer = template_tokenizer(TEMPLATE_DIR / "glm4moe.jinja", {})
    bridge = find_turn_bridge(tokenizer, INSTRUCTION)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    appended = bridge.after([*encode(tokenizer, ANSWER), user])
    assert tokenizer.decode(appended, skip_special_tokens=False) == f"\n{INSTRUCTION}<|assistant|>"


def test_qwen3_thinking_settings_reach_the_generation_prompt():
    path = TEMPLATE_DIR / "qwen3.jinja"
    no_thinking = {"enable_thinking": False}
    off = find_turn_bridge(template_tokenizer(path, no_thinking), INSTRUCTION, no_thinking)
    on = find_turn_bridge(template_tokenizer(path, {}), INSTRUCTION, {})
    tokenizer = template_tokenizer(path, {"enable_thinking": False})
    assert tokenizer.decode(off.instruction_ids, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tokenizer.decode(on.instruction_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    # With thinking off the generation prompt holds an empty think block that the rendering of an answered turn drops,
    # so the turn-2 prompt cannot equal a re-rendering; the sampled tokens (think block included) are kept instead
    assert off.rerenders
