"""score_trl.turns: the correction turn from token ids, the training layout and masks, for the tiny tokenizer and for
every chat template TRL ships."""

import re
from pathlib import Path

import pytest
import trl

from score_trl import MATH_CORRECTION_INSTRUCTION
from score_trl.feedback import VERDICT_INCORRECT, correction_text
from score_trl.turns import TurnBridge, find_turn_bridge, next_attempt_prompts, pack_attempts, turn_masks

from conftest import build_tokenizer


USER = [{"role": "user", "content": "Say the word red."}]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def template_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]


def turn_two_ids(tokenizer, y1_ids):
    bridge = find_turn_bridge(tokenizer, MATH_CORRECTION_INSTRUCTION)
    prompt = template_ids(tokenizer, USER)
    _, [next_prompt] = next_attempt_prompts([prompt], [y1_ids], [bridge])
    return prompt, next_prompt


def test_bridge_pieces_are_gemma_turn_tokens(tokenizer):
    bridge = find_turn_bridge(tokenizer, MATH_CORRECTION_INSTRUCTION)
    end, start = tokenizer.convert_tokens_to_ids(["<end_of_turn>", "<start_of_turn>"])
    assert bridge.close_ids == (end, *encode(tokenizer, "\n"))
    assert bridge.instruction_ids[0] == start
    assert tokenizer.decode(bridge.instruction_ids) == (
        f"<start_of_turn>user\n{MATH_CORRECTION_INSTRUCTION}<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize("stop", ["<end_of_turn>", None])
def test_clean_text_matches_template_rendering(tokenizer, stop):
    # A first attempt that stopped on <end_of_turn>, or was truncated right after clean text: the token-built turn-2
    # prompt must be exactly what the chat template renders for the same conversation.
    text = "The word is red."
    y1 = encode(tokenizer, text) + ([tokenizer.convert_tokens_to_ids(stop)] if stop else [])
    _, built = turn_two_ids(tokenizer, y1)
    expected = template_ids(
        tokenizer,
        [*USER, {"role": "assistant", "content": text}, {"role": "user", "content": MATH_CORRECTION_INSTRUCTION}],
    )
    assert built == expected


def test_eos_ended_attempt_is_kept_and_closed(tokenizer):
    y1 = [*encode(tokenizer, "The word is red."), tokenizer.eos_token_id]
    prompt, built = turn_two_ids(tokenizer, y1)
    bridge = find_turn_bridge(tokenizer, MATH_CORRECTION_INSTRUCTION)
    assert built[len(prompt) : len(prompt) + len(y1)] == y1
    assert built[len(prompt) + len(y1) :] == [*bridge.close_ids, *bridge.instruction_ids]


@pytest.mark.parametrize(
    "y1_text, cut",
    [
        ("  red  \n", 0),  # Gemma's template trims content: re-rendering would drop the spaces that were sampled
        ("日本", 1),  # truncated inside a multi-byte character: decoding is lossy
    ],
)
def test_sampled_ids_survive_where_re_rendering_would_not(tokenizer, y1_text, cut):
    y1 = encode(tokenizer, y1_text)
    y1 = y1[: len(y1) - cut]
    prompt, built = turn_two_ids(tokenizer, y1)
    assert built[len(prompt) : len(prompt) + len(y1)] == y1
    # The naive alternative (decode, re-apply the template) changes the tokens the model sampled.
    decoded = tokenizer.decode(y1, skip_special_tokens=True)
    naive = template_ids(
        tokenizer,
        [*USER, {"role": "assistant", "content": decoded}, {"role": "user", "content": MATH_CORRECTION_INSTRUCTION}],
    )
    assert naive[len(prompt) : len(prompt) + len(y1)] != y1


def test_partial_close_suffix_is_completed():
    bridge = TurnBridge(close_ids=(7, 8), instruction_ids=(9,), special_ids=frozenset({7, 8, 9}))
    assert bridge.after([1, 2, 7]) == [8, 9]
    assert bridge.after([1, 2, 7, 8]) == [9]
    assert bridge.after([1, 2]) == [7, 8, 9]
    assert bridge.after([]) == [7, 8, 9]
    # A stop token that opens the next turn (GLM-4's <|user|>) is shared with the instruction turn, not doubled
    assert TurnBridge((), (9, 5), frozenset({9})).after([1, 9]) == [5]
    # Only a special token at the end can be shared: text that happens to equal the closing's start is kept apart
    assert TurnBridge((7, 8), (9,), frozenset({8})).after([1, 7]) == [7, 8, 9]


def test_pack_attempts_masks_cover_attempts_only():
    y1 = [[11, 12, 13], [21]]
    y2 = [[14], [22, 23, 24, 25]]
    injected = [[90, 91], [92]]
    ids, mask, turns = pack_attempts([y1, y2], [injected], pad_token_id=0)
    assert ids.tolist() == [[11, 12, 13, 90, 91, 14], [21, 92, 22, 23, 24, 25]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert turns.tolist() == [[1, 1, 1, 0, 0, 2], [1, 0, 2, 2, 2, 2]]
    ids, mask, turns = pack_attempts([[[5]], [[6, 7]]], [[[8]]], pad_token_id=0)
    assert ids.tolist() == [[5, 8, 6, 7]] and turns.tolist() == [[1, 0, 2, 2]]
    # Right padding is attended to by nothing and trained by nothing
    ids, mask, turns = pack_attempts([[[5], [1, 2]], [[6], [3]]], [[[8], [9]]], pad_token_id=0)
    assert ids.tolist() == [[5, 8, 6, 0], [1, 2, 9, 3]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert turns.tolist() == [[1, 0, 2, 0], [1, 1, 0, 2]]
    masks = turn_masks(turns, 2)
    assert masks.shape == (2, 2, 4)
    assert masks[:, 0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert masks[:, 1].tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]


def test_tokenizer_without_chat_template_names_the_fix(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        find_turn_bridge(tokenizer, "Fix it.")


def test_template_that_drops_earlier_turns_is_rejected(tokenizer):
    # A template that drops earlier assistant turns cannot keep the first attempt in the correction turn's context.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' or loop.last %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match="drops \\(or repeats\\) an assistant turn"):
        find_turn_bridge(tokenizer, "Fix it.")


def test_chatml_template_bridge(tokenizer):
    # Another family (ChatML, as SmolLM2): closing <|im_end|>\n, generation prompt <|im_start|>assistant\n
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    bridge = find_turn_bridge(tokenizer, "Fix it.")
    assert tokenizer.decode(bridge.close_ids) == "<|im_end|>\n"
    assert tokenizer.decode(bridge.instruction_ids) == "<|im_start|>user\nFix it.<|im_end|>\n<|im_start|>assistant\n"
    y1 = [*encode(tokenizer, "red"), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert tokenizer.decode(bridge.after(y1)).startswith("\n<|im_start|>user")


# ---------------------------------------------------------------------------------------------------------------------
# Every chat template TRL ships
#
# The correction turn for every chat template TRL ships (`trl/chat_templates/*.jinja`), one case per file, so a new
# template in a TRL release shows up here as a passing or failing case. Vision templates are skipped (SCoRe is
# text-only).
#
# Per template, with a small local tokenizer that knows the template's turn tokens as special tokens, the turn-2
# prompt is built from token ids (prompt + sampled first attempt + `TurnBridge.after`), for a first attempt that
# stopped on the template's own stop token and for one that was truncated, and checked against the template itself:
# - the sampled tokens are kept as sampled, and what follows them is, as text, the template's own closing, instruction
#   turn and generation prompt (one stop token, never two);
# - where the template is prefix-stable, the ids equal the tokenized rendering of the whole conversation;
# - no turn token is doubled where the template's rendering has it once (GLM-4's `<|user|><|user|>`);
# - thinking templates honour `enable_thinking`.

TEMPLATE_DIR = Path(trl.__file__).parent / "chat_templates"
TEMPLATES = sorted(TEMPLATE_DIR.glob("*.jinja"))
VISION = ("vl", "idefics", "llava", "smolvlm")
# Turn markers in the renderings: <|im_start|>, <｜User｜>, <start_of_turn>, <|turn>, <turn|>, </think>, [gMASK], ...
SPECIAL = re.compile(r"<\|[^<>\s|]+\|>|<｜[^<>]+?｜>|<\|?[A-Za-z_]+\|?>|</[a-z]+>|\[gMASK\]")
INSTRUCTION = "There might be an error in the answer above. Correct it."
TESTS_FAILURE = "Your code failed this test:\nassert add(2, 3) == 5"  # multi-line, with symbols templates might escape
ANSWER = "The answer is 5."
QUESTION = {"role": "user", "content": "What is 2 + 3?"}


def test_every_template_file_is_listed():
    assert len(TEMPLATES) > 40  # TRL 1.16 ships 73; a moved folder must not silently empty the parametrization


def render(tokenizer, messages, generation_prompt, kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def template_tokenizer(path: Path, kwargs: dict):
    """The test tokenizer with this template and its turn markers registered as special tokens."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = path.read_text()
    conversation = [QUESTION, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": INSTRUCTION}]
    text = render(tokenizer, conversation, True, kwargs) + render(tokenizer, conversation[:2], False, kwargs)
    markers = sorted(set(SPECIAL.findall(text)) - set(tokenizer.all_special_tokens))
    tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    return tokenizer


def cases():
    for path in TEMPLATES:
        thinking = "enable_thinking" in path.read_text()
        for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}) if thinking else ({},):
            marks = [pytest.mark.skip(reason="vision template")] if any(v in path.stem for v in VISION) else []
            label = path.stem + "".join(f"-{k}={v}" for k, v in kwargs.items())
            yield pytest.param(path, kwargs, id=label, marks=marks)


@pytest.mark.parametrize("path, kwargs", list(cases()))
@pytest.mark.parametrize("ending", ["stop", "truncated"])
@pytest.mark.parametrize("feedback", [None, VERDICT_INCORRECT, TESTS_FAILURE], ids=["none", "verdict", "tests"])
def test_correction_turn_follows_the_template(path, kwargs, ending, feedback):
    # With feedback the turn's content is the feedback, a blank line and the instruction (`feedback.correction_text`)
    tokenizer = template_tokenizer(path, kwargs)
    content = correction_text(INSTRUCTION, feedback)
    bridge = find_turn_bridge(tokenizer, content, kwargs)

    prompt_text = render(tokenizer, [QUESTION], True, kwargs)
    answered = render(tokenizer, [QUESTION, {"role": "assistant", "content": ANSWER}], False, kwargs)
    full = [QUESTION, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": content}]
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
    assert text.count(content) == 1
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
