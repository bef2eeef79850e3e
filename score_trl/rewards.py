"""Verifiable rewards with TRL's signature `(completions, **columns) -> list[float | None]`.

Every reward ignores columns it does not use, returns None (not 0) for a row whose reference cannot be read (so RLOO
leaves that row out), and, when the trainer passes `log_extra`, logs what it parsed so the completions table shows
why a row scored 0. All are module-level functions: picklable and selectable by name (see `get_reward_funcs`).
"""

import importlib
import re
import string
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context

from .sandbox import run_python


# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), matching nested braces; `\\boxed 2` (no braces)
    gives the token after the space."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split(maxsplit=1) if text.startswith("\\boxed ", start) else None
    if rest is not None:  # brace-less form
        return re.split(r"[\s$]", rest[1], maxsplit=1)[0] if len(rest) > 1 else None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None


# The paper's (Minerva's) closing sentence, exactly: what `math_strict` requires
_STRICT_FINAL_ANSWER = re.compile(r"Final Answer:\s*The final answer is\s*(.+?)\.?\s*I hope it is correct", re.DOTALL)
# Phrases that announce the final answer. The longest alternative comes first, so "Final Answer: The final answer is"
# is one anchor, not two. "The answer is" needs its article: "answer is" alone also opens ordinary sentences. "Answer:"
# counts only at the start of a line (markdown bold, a heading or a quote mark may come first): inside a sentence it
# also opens ordinary text. Markdown emphasis may close the label ("**Final Answer**: X", "**Answer:** X").
_EMPHASIS = r"(?:\*\*|\*|__)?"
_ANCHOR = re.compile(
    rf"final\s+answer\s*{_EMPHASIS}\s*:\s*(?:the\s+final\s+answer\s+is\b\s*:?)?"
    r"|\bthe\s+(?:final\s+)?answer\s+is\b\s*:?"
    rf"|^[ \t>#*_]*answer\s*{_EMPHASIS}\s*:",
    re.IGNORECASE | re.MULTILINE,
)
# Markdown emphasis around an answer ("**1080**", "*1080*", "__1080__"), which instruction-tuned models often write
_EMPHASIS_MARKS = re.compile(r"^(?:\*\*|\*|__)\s*|\s*(?:\*\*|\*|__)$")
_HASHES = re.compile(r"####\s*([^\n]+)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
# A number followed by words ("18 dollars", "5 apples each"): the words are units, not part of the answer
_NUMBER_WITH_UNITS = re.compile(r"^(-?\d[\d,]*(?:\.\d+)?)\s+[A-Za-z][A-Za-z\s]*$")
_CURRENCY = re.compile(r"^\\?\$\s*(?=-?\d)")
# The end of an unbracketed answer: a sentence's full stop (not a decimal point), or the paper's closing clause
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\s*I hope it is correct", re.IGNORECASE)


def _clean(answer: str) -> str:
    answer = answer.strip().replace("\u2212", "-")  # a typeset minus sign is a minus
    previous = None
    while answer != previous:  # "**1080.**", "**1080**.": emphasis and the full stop, in either order
        previous, answer = answer, _EMPHASIS_MARKS.sub("", answer.rstrip(".").strip())
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer[1:-1].strip()
    answer = _CURRENCY.sub("", answer)  # $18, \\$ 18: a dollar sign before a number is currency
    units = _NUMBER_WITH_UNITS.match(answer)
    if units:
        answer = units.group(1)
    if _THOUSANDS.match(answer):  # GSM8K writes 1,080: a number, not a tuple
        answer = answer.replace(",", "")
    return answer


def _anchored_value(text: str, start: int) -> str:
    """The answer written right after an anchor phrase: a `$...$`, `\\(...\\)` or `\\boxed{}` expression when one
    opens there, else the rest of the sentence (up to its full stop, the paper's closing clause or the line's end)."""
    line = text[start:].lstrip().split("\n", 1)[0]  # "The answer is:" may put the answer on the next line
    if line.startswith(("*", "__")):  # "**Answer:** X", "The answer is **X**"
        line = _EMPHASIS_MARKS.sub("", line, count=1).lstrip()
    for opening, closing in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(opening):
            end = _closing(line, closing, len(opening))
            if end > 0:
                return line[len(opening) : end]
    if line.startswith(("\\boxed", "\\fbox")):
        return last_boxed(line) or ""
    end = _SENTENCE_END.search(line)
    return line[: end.start()] if end else line


def _closing(line: str, delimiter: str, start: int) -> int:
    """Index of the first `delimiter` at or after `start` that is not escaped (`\\$` is a dollar sign), or -1."""
    end = line.find(delimiter, start)
    while end > 0 and line[end - 1] == "\\":
        end = line.find(delimiter, end + 1)
    return end


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final answer a completion states, from the last anchored form in the text: `\\boxed{X}`, "#### X", or an
    answer phrase ("Final Answer: The final answer is $X$. I hope it is correct." with or without its closing clause,
    "Final Answer: X", "The final answer is X", "The answer is X"). A number with no anchor is not an answer.

    `strict=True` accepts only the paper's whole sentence, closing clause included (the `math_strict` reward)."""
    found = []
    if strict:
        sentences = list(_STRICT_FINAL_ANSWER.finditer(text))
        found = [(sentences[-1].start(), sentences[-1].group(1))] if sentences else []
    else:
        found += [(m.start(), _anchored_value(text, m.end())) for m in _ANCHOR.finditer(text)]
        boxed = last_boxed(text)
        if boxed is not None:
            found.append((max(text.rfind("\\boxed"), text.rfind("\\fbox")), boxed))
        hashes = _HASHES.findall(text)
        if hashes:
            found.append((text.rfind("####"), hashes[-1]))
    if not found:
        return None
    answer = _clean(max(found, key=lambda item: item[0])[1])
    return answer or None


def reference_answer(answer: str | None = None, solution: str | None = None) -> str | None:
    """Gold answer from, in order: an `answer` column (GSM8K's "#### X" line or a `\\boxed{}` inside it, else the
    whole value), a `solution` column (its last `\\boxed{}`, else a GSM8K-style "#### X" worked answer)."""
    if answer is not None and str(answer).strip():
        answer = str(answer)
        if "####" in answer or "\\boxed" in answer or "\\fbox" in answer:
            return extract_answer(answer)
        return _clean(answer) or None
    if solution:
        boxed = last_boxed(str(solution))
        if boxed:
            return _clean(boxed) or None
        return extract_answer(str(solution)) if "####" in str(solution) else None
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Math: math-verify


def _verify_pairs(pairs: list[tuple[str | None, str | None]], timeout: int) -> list[bool | None]:
    """math-verify on (gold, prediction) strings. None when the gold does not parse. Uses math-verify's own timeouts,
    which rely on signal.alarm and so only work in a process's main thread."""
    from math_verify import parse, verify

    results = []
    for gold, prediction in pairs:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout) if gold is not None else []
        if not gold_parsed:
            results.append(None)
            continue
        if prediction is None:
            results.append(False)
            continue
        predicted = parse(f"${prediction}$", parsing_timeout=timeout)
        results.append(bool(predicted) and verify(gold_parsed, predicted, timeout_seconds=timeout))
    return results


_verifier_pool: ProcessPoolExecutor | None = None
_verifier_lock = threading.Lock()


def _verify_anywhere(pairs, timeout: int = 5) -> list[bool | None]:
    # In the main thread math-verify's signal timeouts work as they are. Elsewhere (async reward loops, thread pools,
    # servers) they raise, so the batch goes to a spawned worker process, where it runs in that process's main thread.
    if threading.current_thread() is threading.main_thread():
        return _verify_pairs(pairs, timeout)
    global _verifier_pool
    with _verifier_lock:
        if _verifier_pool is None:
            _verifier_pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
        future = _verifier_pool.submit(_verify_pairs, pairs, timeout)
    return future.result(timeout=60 + 2 * timeout * len(pairs))


def _math_reward(completions, answer, solution, log_extra, strict: bool) -> list[float | None]:
    n = len(completions)
    answers = answer if answer is not None else [None] * n
    solutions = solution if solution is not None else [None] * n
    golds = [reference_answer(a, s) for a, s in zip(answers, solutions, strict=True)]
    predictions = [extract_answer(_text(c), strict=strict) for c in completions]
    verdicts = _verify_anywhere(list(zip(golds, predictions, strict=True)))
    if log_extra is not None:
        log_extra("gold", golds)
        log_extra("predicted", predictions)
    return [None if v is None else float(v) for v in verdicts]


def math_answer_reward(completions, answer=None, solution=None, log_extra=None, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference under math-verify, 0.0 otherwise, None when the
    reference cannot be parsed. Reference: `answer` column (GSM8K "#### X" handled) or the last `\\boxed{}` of
    `solution`. Prediction: the last anchored answer (`extract_answer`): `\\boxed{X}`, "#### X", "Final Answer: X",
    "Final Answer: The final answer is $X$[. I hope it is correct.]", "The final answer is X", "The answer is X"."""
    return _math_reward(completions, answer, solution, log_extra, strict=False)


def math_strict_reward(completions, answer=None, solution=None, log_extra=None, **kwargs) -> list[float | None]:
    """As `math_answer_reward`, but the answer counts only in the paper's whole sentence "Final Answer: The final
    answer is $X$. I hope it is correct.": rewards format compliance too (a right answer in any other form is 0)."""
    return _math_reward(completions, answer, solution, log_extra, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# Short answers: normalized exact match

_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(\.\d+)?(?![\w])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """Lower-case; numbers canonical (1,000 -> 1000, 5.0 -> 5, 2.50 -> 2.5) and signed (-4 stays -4, a typeset minus
    too); punctuation and articles dropped; whitespace collapsed."""

    def number(match):
        value = match.group(0).replace(",", "")
        if "." in value:
            value = value.rstrip("0").rstrip(".")
        return f" {value} "

    text = _NUMBER.sub(number, text.lower().replace("\u2212", "-"))  # a typeset minus sign is a minus
    # keep decimal points inside numbers and the sign before them, drop every other punctuation mark
    text = re.sub(r"(?<=\d)\.(?=\d)", "\0", text)
    text = re.sub(r"(?<![\w.])-(?=\d)", "\1", text).translate(_PUNCTUATION)
    text = text.replace("\0", ".").replace("\1", "-")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_reward(completions, correct_answer=None, answer=None, log_extra=None, **kwargs):
    """1.0 when the normalized reference equals the normalized completion or appears in it as a whole-word span
    (so "The capital of France is Paris." matches the reference "Paris"), else 0.0; None without a reference.
    Reference: `correct_answer` (the seed's SCoRe format), else `answer`. See `normalize_text` for the
    normalization. Containment means a completion that lists several candidates can match: prefer short answers."""
    n = len(completions)
    references = correct_answer if correct_answer is not None else answer if answer is not None else [None] * n
    golds = [normalize_text(str(r)) if r is not None and str(r).strip() else None for r in references]
    predictions = [normalize_text(_text(c)) for c in completions]
    if log_extra is not None:
        log_extra("gold", golds)
        log_extra("predicted", predictions)
    return [
        None if g is None else float(g == p or f" {g} " in f" {p} ") for g, p in zip(golds, predictions, strict=True)
    ]


def last_number(text: str) -> str | None:
    """The last number written in the text, canonical as in `normalize_text` (1,000 -> 1000, 5.0 -> 5)."""
    numbers = normalize_text(text).split()
    numbers = [token for token in numbers if _NUMBER.fullmatch(token)]
    return numbers[-1] if numbers else None


def final_answer(text: str) -> str:
    """What a completion answers, for telling whether a revision changed the answer: the anchored answer
    (`extract_answer`), else the last number, else the whole text normalized (`normalize_text`)."""
    return extract_answer(text) or last_number(text) or normalize_text(text)


def numeric_reward(completions, answer=None, correct_answer=None, log_extra=None, **kwargs):
    """1.0 when the last number in the completion equals the reference number, else 0.0; None without a reference.
    Stricter than `exact_match`: a completion that lists candidates ("12, 13 or 14") scores only its last one."""
    references = answer if answer is not None else correct_answer if correct_answer is not None else None
    references = references if references is not None else [None] * len(completions)
    golds = [None if r is None or not str(r).strip() else last_number(str(r)) for r in references]
    predictions = [last_number(_text(c)) for c in completions]
    if log_extra is not None:
        log_extra("gold", [str(g) for g in golds])
        log_extra("predicted", [str(p) for p in predictions])
    return [None if g is None else float(p == g) for g, p in zip(golds, predictions, strict=True)]


# ---------------------------------------------------------------------------------------------------------------------
# Code: run the program against its tests in the sandbox

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python fenced block, else the last fenced block, else the whole text (bare code)."""
    blocks = _FENCE.findall(text)
    python = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return text


def code_tests_program(code: str, test_list=None, test=None, entry_point=None, test_setup_code=None) -> str:
    """The program that passes only if `code` passes its tests: MBPP's `test_list` asserts (after
    `test_setup_code`), or HumanEval's `test` defining `check(candidate)`, called on `entry_point`."""
    parts = [code]
    if test_setup_code:
        parts.append(test_setup_code)
    if test_list:
        parts.extend(test_list)
    if test:
        parts.append(test)
        if entry_point:
            parts.append(f"check({entry_point})")
    return "\n".join(parts) + "\n"


def code_execution_reward(
    completions,
    test_list=None,
    test=None,
    entry_point=None,
    test_setup_code=None,
    log_extra=None,
    timeout: float = 10.0,
    **kwargs,
):
    """1.0 when the program extracted from the completion passes all its tests in the sandbox (separate process,
    wall-clock timeout, memory limit, fresh temporary directory, no network), else 0.0; None for a row without tests.
    Tests: MBPP's `test_list` (+ `test_setup_code`) or HumanEval's `test` + `entry_point`."""
    n = len(completions)

    def column(values):
        return values if values is not None else [None] * n

    programs = []
    for c, tl, t, ep, setup in zip(
        completions, column(test_list), column(test), column(entry_point), column(test_setup_code), strict=True
    ):
        programs.append(None if not tl and not t else code_tests_program(extract_code(_text(c)), tl, t, ep, setup))
    with ThreadPoolExecutor(max_workers=4) as pool:  # each run waits on its own process
        results = list(pool.map(lambda p: None if p is None else run_python(p, timeout=timeout), programs))
    if log_extra is not None:
        log_extra("execution", [None if r is None else r.status for r in results])
    return [None if r is None else float(r.passed) for r in results]


# ---------------------------------------------------------------------------------------------------------------------
# Mixed tasks: each row's own reward


def task_reward(completions, task=None, log_extra=None, **columns) -> list[float | None]:
    """Each row scored by the reward of its own `task` column (`score_trl.data.TASKS`: math, code, short_answer,
    arithmetic), so that data mixing tasks trains and evaluates every row against its own verifier. The CLIs use it
    when the data holds more than one task and no `reward_funcs` are given; None for a row without a task."""
    from .data import TASKS

    tasks = task if task is not None else [None] * len(completions)
    rewards: list[float | None] = [None] * len(completions)
    for name in sorted({t for t in tasks if t is not None}):
        rows = [i for i, t in enumerate(tasks) if t == name]
        subset = {key: [values[i] for i in rows] for key, values in columns.items() if isinstance(values, list)}
        scored = REWARD_FUNCS[TASKS[name].reward]([completions[i] for i in rows], **subset)
        for i, value in zip(rows, scored, strict=True):
            rewards[i] = value
    return rewards


# ---------------------------------------------------------------------------------------------------------------------
# Registry

REWARD_FUNCS = {
    "math": math_answer_reward,
    "math_strict": math_strict_reward,
    "exact_match": exact_match_reward,
    "numeric": numeric_reward,
    "code": code_execution_reward,
    "task": task_reward,
}


def import_function(path: str):
    """The callable a dotted path names (`my_package.module.name` or `my_package.module:name`, as TRL's scripts name
    reward functions); None when the path has no module part. Raises ImportError or AttributeError when it does not
    load, TypeError when what it names is not callable."""
    module_name, sep, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name:
        return None
    func = getattr(importlib.import_module(module_name), attr)
    if not callable(func):
        raise TypeError(f"{path!r} is not callable")
    return func


def get_reward_funcs(names) -> list:
    """Rewards by registry name (`math`, `math_strict`, `exact_match`, `numeric`, `code`, `task`) or by dotted path to
    a user function (`my_package.rewards.my_reward` or `my_package.rewards:my_reward`), as in TRL's scripts."""
    funcs = []
    for name in [names] if isinstance(names, str) else names:
        if name in REWARD_FUNCS:
            funcs.append(REWARD_FUNCS[name])
            continue
        try:
            func = import_function(name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"Cannot load reward {name!r}: {err}") from err
        except TypeError as err:
            raise ValueError(f"Reward {name!r} is not callable.") from err
        if func is None:
            raise ValueError(
                f"Unknown reward {name!r}: use one of {sorted(REWARD_FUNCS)} or a dotted path such as "
                "'my_package.rewards.my_reward'."
            )
        funcs.append(func)
    return funcs


def _text(completion) -> str:
    """Text of a completion: TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""
