import pytest

from score_trl import MATH_CORRECTION_INSTRUCTION
from score_trl.turns import TurnBridge, find_turn_bridge, next_attempt_prompts, pack_attempts, turn_masks


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
