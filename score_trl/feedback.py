"""What the correction turn carries besides the instruction (`SCoReConfig.correction_feedback`), one path for training
and evaluation.

The paper's correction turn is a fixed instruction ("none"). With a verifier at test time the turn can also say what
the verifier found about the attempt just made, placed before the instruction:

- `verdict`: one bit from the task's reward: "Your answer is incorrect." or "Your answer is correct.";
- `tests` (code): the sandbox's result on the row's *visible* tests only (`visible_tests` column): the first failing
  assertion, or the exception type and message. The reward still runs every test;
- a user function with TRL's reward signature (a judge, a compiler) that returns one string per row, None for no
  feedback. It also receives `rewards`: this attempt's combined rewards (None where unscorable).

No feedback may leak what the model is graded against: verdict is one of two fixed sentences, and `tests` runs a
program made of the model's code and the visible tests only, so the hidden tests and the gold answer never reach the
sandbox, let alone the message. A user function is responsible for its own text.
"""

import ast
import doctest
import math
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from .config import CORRECT_THRESHOLD, PLAIN_CORRECTION_FORMAT


FEEDBACK_MODES = ("none", "verdict", "tests")
VERDICT_CORRECT = "Your answer is correct."
VERDICT_INCORRECT = "Your answer is incorrect."
TESTS_PASSED = "Your code passed the visible test."
# How `tests` messages that report a failure begin, for the logged share of rows told "incorrect"
TESTS_FAILED = ("Your code failed", "Your code did not finish", "Your code crashed", "Running your code raised",
                "This test raised")  # fmt: skip
TRUNCATION_MARK = " [...]"


class FeedbackError(RuntimeError):
    """A feedback function failed or returned something that is not a string or None."""


def correction_text(instruction: str, feedback: str | None) -> str:
    """The correction turn's content: the feedback (when there is some), a blank line, the instruction."""
    return instruction if feedback is None else f"{feedback.strip()}\n\n{instruction}"


def verdict_feedback(prompts=None, completions=None, rewards=None, threshold: float = CORRECT_THRESHOLD, **kwargs):
    """One bit per row from the attempt's reward: VERDICT_CORRECT at or above `threshold`, VERDICT_INCORRECT below,
    None (no feedback) where the attempt could not be scored."""
    return [
        None if r is None or math.isnan(r) else VERDICT_CORRECT if r >= threshold else VERDICT_INCORRECT
        for r in rewards
    ]


def visible_tests_feedback(prompts=None, completions=None, visible_tests=None, test_setup_code=None,
                           timeout: float = 10.0, **kwargs) -> list[str | None]:  # fmt: skip
    """Per row, the visible tests run in the sandbox on the completion's program (`rewards.extract_code`): which
    test failed first and how, or TESTS_PASSED; None for a row without visible tests."""
    from .rewards import _text, extract_code
    from .sandbox import run_python

    n = len(completions)
    setups = test_setup_code if test_setup_code is not None else [None] * n
    tests = visible_tests if visible_tests is not None else [None] * n
    marker = secrets.token_hex(8)  # the model's own prints cannot pose as the harness's verdict
    programs = [
        visible_tests_program(extract_code(_text(c)), t, s, marker) if t else None
        for c, t, s in zip(completions, tests, setups, strict=True)
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:  # each run waits on its own process
        results = list(pool.map(lambda p: None if p is None else run_python(p, timeout=timeout), programs))
    return [
        None if r is None else tests_message(r.status, r.output, marker, t)
        for r, t in zip(results, tests, strict=True)
    ]


def visible_tests_program(code: str, tests: list[str], setup: str | None, marker: str) -> str:
    """A program that runs `code`, then each visible test in order, and prints one marked line for the first failure:
    `<marker> code <Exception>: <message>` when the code itself fails, `<marker> test <i> <Exception>: <message>`
    when test i does (AssertionError for a failed assert), or `<marker> passed`."""
    return (
        "import sys\n"
        f"_code, _setup, _tests, _marker = {code!r}, {setup or ''!r}, {list(tests)!r}, {marker!r}\n"
        "_scope = {'__name__': '__main__'}\n"
        "def _report(where, err):\n"
        "    print(_marker, where, f'{type(err).__name__}: {err}', flush=True)\n"
        "    sys.exit(1)\n"
        "try:\n"
        "    exec(compile(_code + '\\n' + _setup, 'solution.py', 'exec'), _scope)\n"
        "except BaseException as err:\n"
        "    _report('code', err)\n"
        "for _i, _test in enumerate(_tests):\n"
        "    try:\n"
        "        exec(compile(_test, 'test.py', 'exec'), _scope)\n"
        "    except BaseException as err:\n"
        "        _report(f'test {_i}', err)\n"
        "print(_marker, 'passed', flush=True)\n"
    )


def tests_message(status: str, output: str, marker: str, tests: list[str]) -> str:
    """The feedback text from one run of `visible_tests_program`: built from our own templates, the visible test and
    the exception the program raised (never from the rest of its output)."""
    lines = [line for line in output.splitlines() if line.startswith(marker + " ")]
    if status == "timeout":
        return "Your code did not finish the visible test within the time limit."
    if not lines:
        return "Your code crashed the test run without an error message (it may have exited or run out of memory)."
    report = lines[-1][len(marker) + 1 :]
    if report == "passed":
        return TESTS_PASSED
    where, _, error = report.partition(" ")
    if where == "code":
        return f"Running your code raised {error.strip()}"
    index = int(error.split(" ", 1)[0])
    error = error.split(" ", 1)[1].strip()
    if error.startswith("AssertionError"):
        return f"Your code failed this test:\n{tests[index]}"
    return f"This test raised {error}:\n{tests[index]}"


def doctest_asserts(prompt: str, entry_point: str | None = None) -> list[str]:
    """HumanEval's visible tests: the docstring's `>>> call` / expected-output examples as asserts (only examples
    whose expected output is a Python literal, and that call `entry_point` when given)."""
    out = []
    for example in doctest.DocTestParser().get_examples(prompt):
        # the docstring's closing quotes can follow the last example's output without a blank line
        want = "\n".join(line for line in example.want.splitlines() if line.strip() not in ('"""', "'''"))
        source, want = example.source.strip(), want.strip()
        if not want or (entry_point and entry_point not in source):
            continue
        try:
            ast.literal_eval(want)
        except (ValueError, SyntaxError):
            continue
        out.append(f"assert {source} == {want}")
    return out


def resolve_feedback(spec, threshold: float = CORRECT_THRESHOLD) -> tuple[str, Callable | None]:
    """(name, function or None) of `correction_feedback`: "none", "verdict", "tests", a dotted path to a function
    (`my_package.judges.judge` or `my_package.judges:judge`), or a callable."""
    if spec is None or spec == "none":
        return "none", None
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    if spec == "verdict":
        return "verdict", partial(verdict_feedback, threshold=threshold)
    if spec == "tests":
        return "tests", visible_tests_feedback
    from .rewards import import_function  # loaded by dotted path as reward functions are

    try:
        func = import_function(spec)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"correction_feedback={spec!r}: cannot load the function: {err}") from err
    except TypeError as err:
        raise ValueError(f"correction_feedback={spec!r} is not callable.") from err
    if func is None:
        raise ValueError(
            f"correction_feedback={spec!r}: use one of {list(FEEDBACK_MODES)} or a dotted path to a function with "
            "the reward signature that returns one string (or None) per row, e.g. 'my_package.judges.judge'."
        )
    return spec, func


def check_feedback(name: str, values, expected: int) -> list[str | None]:
    """A list of `expected` strings or None, else FeedbackError naming the function and the row."""
    if not isinstance(values, list | tuple) or len(values) != expected:
        got = f"{len(values)} values" if isinstance(values, list | tuple) else type(values).__name__
        raise FeedbackError(f"feedback function {name!r} returned {got}; expected a list of {expected}, one per row.")
    for row, value in enumerate(values, start=1):
        if value is not None and not isinstance(value, str):
            raise FeedbackError(
                f"feedback function {name!r} returned {type(value).__name__} {value!r} for row {row}: feedback must "
                "be a string, or None for no feedback on that row."
            )
    return list(values)


def truncate(tokenizer, text: str | None, max_tokens: int | None) -> tuple[str | None, bool]:
    """(text cut to its first `max_tokens` tokens with TRUNCATION_MARK appended, whether it was cut)."""
    if text is None or not max_tokens:
        return text, False
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True) + TRUNCATION_MARK, True


def told_incorrect(feedback: str | None, reward: float | None, threshold: float = CORRECT_THRESHOLD) -> bool:
    """Whether a row's correction turn tells the model its attempt was wrong: a built-in message other than a pass
    (VERDICT_INCORRECT, a failed visible test); for a user function's text, feedback on an attempt scored below
    `threshold`."""
    if feedback is None or feedback in (VERDICT_CORRECT, TESTS_PASSED):
        return False
    if feedback == VERDICT_INCORRECT or feedback.startswith(TESTS_FAILED):
        return True
    return reward is not None and not math.isnan(reward) and reward < threshold


def feedback_for_attempt(func, name: str, rows: list[dict], conversations: list, texts: list[str], completion_ids,
                         rewards: list, tokenizer, max_tokens: int | None, timeout: float | None = None,
                         where: str = "") -> tuple[list[str | None], int]:  # fmt: skip
    """Call a feedback function on one attempt's batch as a reward function is called (the conversations answered,
    the completions as chat messages, their ids, every dataset column but `prompt`), plus `rewards`; checks what it
    returns and cuts each text to `max_tokens`. Returns (feedback per row, how many were cut). Any failure, a
    `timeout` overrun included, raises FeedbackError naming the function and `where` (attempt and step)."""
    from .reward_checks import RewardTimeout, call_with_timeout
    from .scoring import as_completion, is_plain

    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
    call = {"prompts": conversations, "completions": [as_completion(text, is_plain(conversations)) for text in texts],
            "completion_ids": completion_ids, **columns, "rewards": rewards}  # fmt: skip
    try:
        values = call_with_timeout(func, timeout, name, **call)
    except RewardTimeout as err:
        raise FeedbackError(f"feedback function {name!r} did not return within {timeout:g} s{where}.") from err
    except Exception as err:
        raise FeedbackError(f"feedback function {name!r} failed{where}: {type(err).__name__}: {err}") from err
    cut = [truncate(tokenizer, value, max_tokens) for value in check_feedback(name, values, len(texts))]
    return [text for text, _ in cut], sum(was_cut for _, was_cut in cut)


class CorrectionTurns:
    """Each row's correction turn after an attempt, for training and evaluation alike: the feedback on that attempt
    (`correction_feedback`, cut to `max_tokens`) before the row's instruction, as the token ids the chat template puts
    there (`turns.find_turn_bridge`, cached per distinct text)."""

    _CACHE_SIZE = 4096  # distinct correction texts kept (tests feedback makes one per row)

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None, correction_feedback="none",
                 max_tokens: int | None = None, timeout: float | None = None,
                 threshold: float = CORRECT_THRESHOLD, plain_format: str = PLAIN_CORRECTION_FORMAT):  # fmt: skip
        self.tokenizer, self.kwargs, self.plain_format = tokenizer, chat_template_kwargs or {}, plain_format
        self.name, self.func = resolve_feedback(correction_feedback, threshold)
        self.max_tokens, self.timeout, self.threshold = max_tokens, timeout, threshold
        self._bridges = {}

    def bridge(self, text: str, plain: bool = False):
        """The turn's ids for correction `text`: the chat template's user turn, or for plain-text prompts
        `plain_format` around it (`turns.plain_bridge`)."""
        from .turns import find_turn_bridge, plain_bridge

        if (text, plain) not in self._bridges:
            if len(self._bridges) >= self._CACHE_SIZE:
                self._bridges.clear()
            self._bridges[text, plain] = (
                plain_bridge(self.tokenizer, self.plain_format.format(correction=text))
                if plain
                else find_turn_bridge(self.tokenizer, text, self.kwargs)
            )
        return self._bridges[text, plain]

    def after(self, rows, instructions, conversations, texts, completion_ids, rewards, where: str = ""):
        """(correction texts, their bridges, feedback per row, number of feedback texts cut) after one attempt, whose
        rows answered `conversations` (strings for plain-text prompts) with `texts` / `completion_ids` and scored
        `rewards` (None: unscorable)."""
        from .scoring import is_plain

        feedback, cut = [None] * len(texts), 0
        if self.func is not None:
            feedback, cut = feedback_for_attempt(
                self.func, self.name, rows, conversations, texts, completion_ids, rewards, self.tokenizer,
                self.max_tokens, self.timeout, where,
            )  # fmt: skip
        corrections = [correction_text(i, f) for i, f in zip(instructions, feedback, strict=True)]
        plain = is_plain(conversations)
        return corrections, [self.bridge(text, plain) for text in corrections], feedback, cut


def check_feedback_inputs(spec, rows: list[dict], tokenizer, remove_unused_columns: bool = False, timeout=None,
                          dataset_name: str = "train_dataset"):  # fmt: skip
    """Before any model loads: `tests` needs a `visible_tests` column the trainer keeps, and a user function is
    called once on the first rows with empty completions, so that a wrong signature or a non-string answer fails
    now, naming the function, the row and the fix."""
    from .inputs import surviving_columns

    name, func = resolve_feedback(spec)
    if func is None or not rows:
        return
    seen = surviving_columns(rows, remove_unused_columns)
    if name == "tests" and not any(row.get("visible_tests") for row in seen):
        kept = " (remove_unused_columns=True drops it: set it to False)" if remove_unused_columns else ""
        raise ValueError(
            f"correction_feedback='tests' runs each row's visible tests, but {dataset_name} has no `visible_tests` "
            f"column{kept} (columns: {sorted(rows[0])}). score_trl.data fills it for MBPP (the first of test_list) "
            "and HumanEval (the docstring's examples); for other data add a list of assert strings per row, e.g. "
            "dataset.map(lambda x: {'visible_tests': x['test_list'][:1]})."
        )
    if name == "tests":
        return  # runs model code in the sandbox: nothing to learn from an empty program
    conversations = [row["prompt"] for row in seen]
    feedback_for_attempt(func, name, seen, conversations, [""] * len(seen), [[] for _ in seen], [0.0] * len(seen),
                         tokenizer, None, timeout, f", called before training on {dataset_name} rows 1-{len(seen)} "
                         "with empty placeholder completions")  # fmt: skip
