"""Token-level construction of the correction turn and of the training layout.

The next attempt's prompt is built from token ids: the previous prompt, the sampled completion ids unchanged, the
template's end-of-turn tokens, the instruction as a user turn and the generation prompt, all as the template renders
them. Templates that re-render earlier turns (Qwen3 drops old think blocks, gpt-oss turns <|return|> into <|end|>) are
handled the same way: the sampled tokens stay as sampled and the template's own closing and turns follow. Decoding
a completion and re-applying the chat template would re-tokenize it (Gemma's template trims text, a truncated
multi-byte character decodes lossily), so the context of the next turn would differ from what was sampled and its
log-probs would be off-policy.
"""

from dataclasses import dataclass

import torch
from jinja2 import TemplateError
from trl.trainer.utils import pad

from .config import MATH_CORRECTION_INSTRUCTION


# A placeholder assistant message, rendered once to find the pieces of the template around it. Plain letters so that
# no template trims or escapes it.
_SENTINEL = "SCoReSentinelAnswer"


@dataclass(frozen=True)
class TurnBridge:
    """The tokens a chat template puts between an assistant turn's content and the next assistant turn's content.

    Attributes:
        close_ids: tokens that end an assistant turn after its content (Gemma: `<end_of_turn>`, `\\n`); empty for
            templates whose stop token opens the next turn (GLM-4's `<|user|>`).
        instruction_ids: the user turn holding the instruction, followed by the generation prompt (with whatever the
            template opens an assistant turn with, e.g. Qwen3's empty think block when thinking is off).
        special_ids: the tokenizer's special tokens. A completion that ends on one of them (it stopped on a turn
            token) may share it with the bridge; one that ends on text never does.
        rerenders: the template renders earlier turns differently once a turn is added (Qwen3's thinking, gpt-oss,
            Phi-3's closing <eos>), or its generation prompt is not how it renders an answered turn (DeepSeek-R1's
            `<think>`): the correction turn then cannot equal a re-rendering of the whole conversation, and is the
            sampled tokens followed by the template's own closing, instruction turn and generation prompt.
    """

    close_ids: tuple[int, ...]
    instruction_ids: tuple[int, ...]
    special_ids: frozenset = frozenset()
    rerenders: bool = False

    def after(self, completion_ids: list[int]) -> list[int]:
        """Tokens to append after `completion_ids` to open the next attempt.

        A completion that ended on a special token which starts the bridge (Qwen's `<|im_end|>`, Gemma's
        `<end_of_turn>`, GLM-4's `<|user|>`) gets only the rest, so no turn token is doubled; one that ended on
        another EOS or was truncated gets all of it. The completion itself is never edited.
        """
        bridge = self.close_ids + self.instruction_ids
        if completion_ids and completion_ids[-1] in self.special_ids:
            for k in range(min(len(bridge), len(completion_ids)), 0, -1):
                if tuple(completion_ids[-k:]) == bridge[:k]:
                    return list(bridge[k:])
        return list(bridge)


def _render(tokenizer, messages, add_generation_prompt, chat_template_kwargs):
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **chat_template_kwargs
    )


def special_token_ids(tokenizer) -> frozenset:
    """Every special token id: the named ones and added tokens marked special (GGUF tokenizers do not always list
    turn tokens such as Gemma's <end_of_turn> among `all_special_ids`)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return frozenset(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


def find_turn_bridge(tokenizer, instruction: str, chat_template_kwargs: dict | None = None) -> TurnBridge:
    """Find the correction-turn tokens by rendering the tokenizer's chat template around a placeholder answer.

    Renders [user] with the generation prompt, [user, assistant] and [user, assistant, user=instruction] with the
    generation prompt (`chat_template_kwargs`, e.g. `enable_thinking`, honoured in each). The text the last rendering
    puts after the assistant content is the template's own closing, instruction turn and generation prompt; the part
    of it the second rendering shares is the closing. Both are tokenized on their own: they start with a special
    token, so no merge crosses the boundary with the sampled tokens.
    """
    kwargs = chat_template_kwargs or {}
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template, so the correction turn cannot be built. Set "
            "`tokenizer.chat_template` (e.g. TRL ships `trl/chat_templates/gemma.jinja` for Gemma base models)."
        )
    user = {"role": "user", "content": "Question?"}
    answer = {"role": "assistant", "content": _SENTINEL}
    correction = {"role": "user", "content": instruction}
    try:
        prompt = _render(tokenizer, [user], True, kwargs)
        with_answer = _render(tokenizer, [user, answer], False, kwargs)
        with_correction = _render(tokenizer, [user, answer, correction], True, kwargs)
    except TemplateError as err:
        raise ValueError(f"The chat template cannot render a user/assistant/user conversation: {err}") from err
    if with_answer.count(_SENTINEL) != 1 or with_correction.count(_SENTINEL) != 1:
        raise ValueError(
            "The chat template drops (or repeats) an assistant turn's content when it renders a conversation, so "
            "the first attempt cannot stay in the context of the correction turn. Use a template that keeps "
            "earlier assistant turns."
        )
    bridge_text = with_correction.split(_SENTINEL, 1)[1]
    if instruction not in bridge_text:
        raise ValueError("The chat template does not render the correction instruction after the first attempt.")

    def encode(text):
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    bridge, last_close = encode(bridge_text), encode(with_answer.split(_SENTINEL, 1)[1])
    n = 0
    while n < min(len(bridge), len(last_close)) and bridge[n] == last_close[n]:
        n += 1
    return TurnBridge(
        close_ids=bridge[:n],
        instruction_ids=bridge[n:],
        special_ids=special_token_ids(tokenizer),
        rerenders=with_correction != prompt + _SENTINEL + bridge_text,
    )


def plain_bridge(tokenizer, text: str) -> TurnBridge:
    """The correction turn of a plain-text (standard) prompt: `text` (the formatted correction, e.g. "\\n\\nFix
    it.\\n\\n") tokenized on its own and appended after the sampled tokens, whatever they end with, so the sampled
    ids stay as sampled. The boundary is a token boundary by construction: the ids must decode back to the text."""
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.decode(ids) != text:
        raise ValueError(
            f"The tokenizer does not round-trip the plain correction turn {text!r} (it decodes to "
            f"{tokenizer.decode(ids)!r}), so the appended tokens would not be that text. Change "
            "plain_correction_format (e.g. start it with a newline) or the instruction."
        )
    return TurnBridge(close_ids=(), instruction_ids=ids)


def instruction_for(row: dict, configured: str | None = None) -> str:
    """The correction instruction of a row, in training and evaluation alike: `configured` for every row when set
    (SCoReConfig.correction_instruction, score-eval's flag), else the row's `correction_instruction` column (set per
    task by `score_trl.data`), else the paper's MATH instruction."""
    return configured or row.get("correction_instruction") or MATH_CORRECTION_INSTRUCTION


def next_attempt_prompts(prompt_ids, completion_ids, bridges) -> tuple[list[list[int]], list[list[int]]]:
    """Per row: the tokens appended after the completion (`bridge.after`) and the next attempt's full prompt."""
    appended = [bridge.after(c) for c, bridge in zip(completion_ids, bridges, strict=True)]
    prompts = [p + c + a for p, c, a in zip(prompt_ids, completion_ids, appended, strict=True)]
    return appended, prompts


def pack_attempts(attempts, appended, pad_token_id, pad_to_multiple_of=None, device=None):
    """Lay out attempts as one right-padded completion per row: y1 + appended1 + y2 (+ appended2 + y3 ...).

    Args:
        attempts: `attempts[t][i]` is row i's completion ids for attempt t (0-based).
        appended: `appended[t][i]` is row i's injected tokens after attempt t (one list fewer than `attempts`).

    Returns:
        `completion_ids` (B, C), `completion_mask` (B, C) with 1 on every real token (what the model attends to), and
        `turn_ids` (B, C) with t + 1 on attempt t's tokens and 0 on injected and padding tokens (what is trained).
    """
    if len(appended) != len(attempts) - 1:
        raise ValueError("pack_attempts needs one list of appended tokens between each pair of attempts.")
    num_rows = len(attempts[0])
    rows, turns = [], []
    for i in range(num_rows):
        ids, turn = [], []
        for t, attempt in enumerate(attempts):
            ids += attempt[i]
            turn += [t + 1] * len(attempt[i])
            if t < len(appended):
                ids += appended[t][i]
                turn += [0] * len(appended[t][i])
        rows.append(torch.tensor(ids, dtype=torch.long))
        turns.append(torch.tensor(turn, dtype=torch.long))
    completion_ids = pad(rows, padding_value=pad_token_id, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)
    completion_mask = pad(
        [torch.ones_like(r) for r in rows],
        padding_value=0,
        padding_side="right",
        pad_to_multiple_of=pad_to_multiple_of,
    )
    turn_ids = pad(turns, padding_value=0, padding_side="right", pad_to_multiple_of=pad_to_multiple_of)
    return completion_ids.to(device), completion_mask.to(device), turn_ids.to(device)


def turn_masks(turn_ids: torch.Tensor, num_attempts: int) -> torch.Tensor:
    """(B, C) turn ids -> (B, num_attempts, C) float masks, one per attempt."""
    turns = torch.arange(1, num_attempts + 1, device=turn_ids.device).view(1, -1, 1)
    return (turn_ids.unsqueeze(1) == turns).float()


def training_layout(prompt_ids, attempts, appended, pad_token_id, pad_to_multiple_of, device, truncated=None) -> dict:
    """The training rows: x left-padded | y1 + correction turn + y2 ... right-padded, and `turn_ids` marking the
    trained tokens of each attempt. With `truncated[t][i]` (`mask_truncated_completions`), a truncated attempt stays
    in the context but leaves the loss."""
    completion_ids, completion_mask, turn_ids = pack_attempts(
        attempts, appended, pad_token_id, pad_to_multiple_of, device
    )
    for t, flags in enumerate(truncated or []):
        turn_ids = turn_ids.masked_fill((turn_ids == t + 1) & torch.tensor(flags, device=device).unsqueeze(1), 0)
    prompts = [torch.tensor(ids) for ids in prompt_ids]
    return {
        "prompt_ids": pad(prompts, pad_token_id, "left", pad_to_multiple_of).to(device),
        "prompt_mask": pad([torch.ones_like(p) for p in prompts], 0, "left", pad_to_multiple_of).to(device),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "turn_ids": turn_ids,
    }
